"""The checkpoint: the one artifact every training stage hands to the next.

`layout` names its files and checks them, `save` writes one, `load` is the only way any stage
reads one (it verifies before it reads), `hf` converts to and from Hugging Face directories.
"""
