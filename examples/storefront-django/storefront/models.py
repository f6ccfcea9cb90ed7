from django.contrib.auth.base_user import AbstractBaseUser
from django.db import models


class User(AbstractBaseUser):
    """A storefront user, made at first login. The username is the primary key because the
    session engine binds the session to `_auth_user_id`, the primary key: sessions are then
    bound to "alice", the user the other adapters read from sessiond. No password: logging
    in is the contract's `POST /login {"user"}`."""

    username = models.CharField(max_length=150, primary_key=True)

    USERNAME_FIELD = "username"
