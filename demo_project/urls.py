from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("workflows/", include("django_openworkflow.urls")),
    path("", include("demo_project.orders.urls")),
]
