"""The Django storefront (see serve.py): settings, the user model, the views."""
