"""A project that uses the admin but did not include django_openworkflow.urls."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
