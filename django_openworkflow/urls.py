from django.urls import path

from . import views

app_name = "django_openworkflow"

urlpatterns = [
    path("", views.run_list, name="run-list"),
    path("queues/", views.queue_list, name="queues"),
    path("schedules/", views.schedule_list, name="schedules"),
    path("workers/", views.worker_list, name="workers"),
    path("<uuid:run_id>/", views.run_detail, name="run-detail"),
    path("<uuid:run_id>/resume/", views.run_resume, name="run-resume"),
    path("<uuid:run_id>/cancel/", views.run_cancel, name="run-cancel"),
    path("<uuid:run_id>/rerun/", views.run_rerun, name="run-rerun"),
    path("<uuid:run_id>/resume-with-changes/", views.run_correct, name="run-correct"),
]
