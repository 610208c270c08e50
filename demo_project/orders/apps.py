from django.apps import AppConfig


class OrdersConfig(AppConfig):
    name = "demo_project.orders"
    label = "orders"
    verbose_name = "Demo shop"
    default_auto_field = "django.db.models.BigAutoField"
