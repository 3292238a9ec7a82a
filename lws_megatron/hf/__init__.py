"""The Hugging Face side of an export: the modeling code that ships inside every export dir.

Importing it needs `transformers` (the `hf` extra); the training runtime never does.
"""
