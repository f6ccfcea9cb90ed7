from django.urls import path

from . import views

urlpatterns = [
    path("cart", views.view_cart),
    path("cart/items", views.add_item),
    path("login", views.login),
    path("logout", views.logout),
    path("logout-all", views.logout_all),
    path("devices", views.devices),
]
