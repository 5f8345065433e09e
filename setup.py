"""Installs the LLaDA pretraining stack's three packages: pretrain, parallel, data_pipeline."""

from setuptools import find_packages, setup

# In requirements.txt (the tests need them) but not needed to train: extras here.
OPTIONAL = {"pytest": "pytest", "ruff": "ruff", "lm-eval": "lm-eval>=0.4.12", "wandb": "wandb",
            "mlflow-skinny": "mlflow-skinny"}

setup(
    name="llada-stack",
    version="0.1.0",
    description="Pretraining stack for LLaDA masked diffusion language models on DeepSpeed",
    packages=find_packages(include=["pretrain", "pretrain.*", "parallel", "parallel.*",
                                    "data_pipeline", "data_pipeline.*"]),
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt")
                      if line.strip() and not line.startswith("#")
                      and line.split(">")[0].strip() not in OPTIONAL],
    # the experiment trackers (logging.wandb, logging.mlflow); MLflow's client alone suffices
    extras_require={"test": ["pytest", "ruff"], "lm-eval": [OPTIONAL["lm-eval"]], "wandb": [OPTIONAL["wandb"]],
                    "mlflow": [OPTIONAL["mlflow-skinny"]]},
)
