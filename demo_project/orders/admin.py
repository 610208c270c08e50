from django.contrib import admin
from django.utils.html import format_html

from django_openworkflow.admin import WorkflowRunInline, WorkflowRunsMixin

from .models import Card, Order, Product


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["name", "stock"]
    list_editable = ["stock"]
    search_fields = ["name"]


@admin.register(Card)
class CardAdmin(admin.ModelAdmin):
    list_display = ["holder", "last4", "declined"]
    list_editable = ["declined"]


@admin.register(Order)
class OrderAdmin(WorkflowRunsMixin, admin.ModelAdmin):
    """Orders with their workflow runs: listed on each order's page (the inline), resumed or
    canceled from the list (the actions "Resume failed workflow runs" and "Cancel active
    workflow runs" act on the selected orders' runs)."""

    inlines = [WorkflowRunInline]
    list_display = ["reference", "product", "quantity", "card", "status", "run_link", "created_at"]
    list_filter = ["status", "card"]
    search_fields = ["reference", "tracking_number", "charge_id"]
    list_select_related = ["product", "card"]
    readonly_fields = [
        "status",
        "run_link",
        "charge_id",
        "packed_by",
        "tracking_number",
        "created_at",
    ]

    @admin.display(description="workflow run")
    def run_link(self, order: Order) -> str:
        url = order.get_run_url()
        if url is None:
            return "-"
        return format_html('<a href="{}">{}</a>', url, order.run_id)
