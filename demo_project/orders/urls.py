from django.urls import path

from . import views

app_name = "orders"

urlpatterns = [
    path("", views.order_list, name="order-list"),
    path("orders/", views.place_order, name="place-order"),
    path("orders/<int:pk>/confirm-packed/", views.confirm_packed, name="confirm-packed"),
    path("cards/<int:pk>/fix/", views.set_card_declined, {"declined": False}, name="card-fix"),
    path(
        "cards/<int:pk>/decline/", views.set_card_declined, {"declined": True}, name="card-decline"
    ),
]
