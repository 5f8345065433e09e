"""The stand-alone Hugging Face modeling code copied beside every export."""
