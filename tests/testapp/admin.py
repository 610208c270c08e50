"""The test app's subjects in the admin, as a project would register its own models."""

from django.contrib import admin, messages

from django_openworkflow.admin import WorkflowRunInline, WorkflowRunsMixin

from .models import Coupon, Invoice, Parcel


@admin.register(Invoice)
class InvoiceAdmin(WorkflowRunsMixin, admin.ModelAdmin):
    """With actions of its own: the mixin adds its two, it does not replace these."""

    inlines = [WorkflowRunInline]
    actions = ["mark_checked"]

    @admin.action(description="Mark checked")
    def mark_checked(self, request, queryset):
        self.message_user(request, f"{queryset.count()} checked.", messages.SUCCESS)


@admin.register(Parcel)
class ParcelAdmin(WorkflowRunsMixin, admin.ModelAdmin):
    inlines = [WorkflowRunInline]


@admin.register(Coupon)
class CouponAdmin(WorkflowRunsMixin, admin.ModelAdmin):
    inlines = [WorkflowRunInline]
