from django.contrib import admin
from django.urls import include, path

from tests.testapp.views import start_and_wait

urlpatterns = [
    path("admin/", admin.site.urls),
    path("workflows/", include("django_openworkflow.urls")),
    path("async/start-and-wait/", start_and_wait),
]
