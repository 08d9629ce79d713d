from django.urls import path

from monitoring import views

urlpatterns = [
    path("health", views.health, name="health"),
    path("health/detailed", views.HealthDetailedView.as_view(), name="health-detailed"),
    path("statistics", views.StatisticsView.as_view(), name="statistics"),
    path("metrics", views.MetricsView.as_view(), name="metrics"),
]
