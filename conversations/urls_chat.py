from django.urls import path

from conversations.views import ChatView

urlpatterns = [
    path("chat", ChatView.as_view(), name="chat"),
]
