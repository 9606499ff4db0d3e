from django.contrib import admin
from django.urls import path

from registry.ops import views

urlpatterns = [
    path("", views.service_info, name="service-info"),
    path("debug/list_workers", views.debug_list_workers, name="debug-list-workers"),
    path("api/workers/", views.worker_list, name="worker-list"),
    path("api/workers/<str:worker_id>/", views.worker_detail, name="worker-detail"),
    path("api/peer-connections/", views.peer_connection_list, name="peer-connection-list"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.prometheus_metrics, name="metrics"),
    path("admin/", admin.site.urls),
]

handler400 = "registry.ops.views.handler400"
handler403 = "registry.ops.views.handler403"
handler404 = "registry.ops.views.handler404"
handler500 = "registry.ops.views.handler500"
