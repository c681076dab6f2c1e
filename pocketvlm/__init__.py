"""pocketvlm: small vision-language models on the machines people carry."""
__version__ = "0.1.0"
