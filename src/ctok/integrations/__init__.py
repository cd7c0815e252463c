"""Adapters that let other libraries use ctok models; each is imported only when asked for.

:mod:`ctok.integrations.diffusers` (``pip install 'ctok[diffusers]'``): a ctok tokenizer as a
diffusers autoencoder. Nothing here is imported by ``import ctok``, so ctok never needs the
libraries it adapts to.
"""
