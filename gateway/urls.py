"""Auth and key-management routes (no trailing slashes, as in the product brief)."""

from django.urls import URLPattern, URLResolver, path

from gateway import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("auth/token", views.TokenView.as_view(), name="auth-token"),
    path("auth/token/refresh", views.TokenRefreshView.as_view(), name="auth-token-refresh"),
    path("auth/token/revoke", views.TokenRevokeView.as_view(), name="auth-token-revoke"),
    path("auth/whoami", views.WhoAmIView.as_view(), name="auth-whoami"),
    path("auth/keys", views.KeyListView.as_view(), name="auth-keys"),
    path("auth/keys/<int:key_id>/revoke", views.KeyRevokeView.as_view(), name="auth-key-revoke"),
    path("auth/keys/<int:key_id>/rotate", views.KeyRotateView.as_view(), name="auth-key-rotate"),
]
