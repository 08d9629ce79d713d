"""Routes of the OpenAI-compatible API."""

from django.urls import URLPattern, URLResolver, path

from openai_api import views

urlpatterns: list[URLPattern | URLResolver] = [
    path("v1/models", views.ModelsView.as_view(), name="v1-models"),
    path("v1/models/<str:model_id>", views.ModelView.as_view(), name="v1-model"),
    path("v1/chat/completions", views.ChatCompletionsView.as_view(), name="v1-chat-completions"),
]
