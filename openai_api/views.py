"""GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions: OpenAI's Chat Completions
API over the same start-run and follow-events services as /chat and /ws, behind the same
guards (keys, JWT, permissions, rate limits, quotas, IP blocks, CORS)."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from typing import Any

from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from conversations.selectors import achat_result
from conversations.services import ConversationError, conversation_run, conversation_start, release_connection
from gateway.asyncviews import APIView
from gateway.permissions import CanRead, CanWrite
from gateway.principal import principal_of
from openai_api import chunks, schemas
from openai_api.errors import openai_error, openai_exception_handler
from openai_api.parsing import CompletionRequest, RequestRefused, parse
from openai_api.stream import completion_stream
from panels.registry import PanelNotFound, list_panels, resolve_panel, start_options

# Runs started here are kept referenced until they finish.
_RUNNING: set[asyncio.Task[Any]] = set()


class OpenAIView(APIView):
    def get_exception_handler(self) -> Any:
        return openai_exception_handler


def model_not_found(model: str) -> Response:
    return openai_error(
        404,
        f"The model {model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


class ModelsView(OpenAIView):
    permission_classes = [CanRead]

    @extend_schema(
        operation_id="v1_models_list",
        summary="The panels this key may use, as OpenAI model objects",
        responses={200: OpenApiResponse(schemas.MODEL_LIST), **schemas.errors(401, 403, 429)},
        tags=["openai"],
    )
    async def get(self, request: Request) -> Response:
        panels = await list_panels(principal=principal_of(request))
        return Response({"object": "list", "data": [chunks.model_object(p) for p in panels]})


class ModelView(OpenAIView):
    permission_classes = [CanRead]

    @extend_schema(
        operation_id="v1_models_retrieve",
        summary="One panel as an OpenAI model object",
        responses={200: OpenApiResponse(schemas.MODEL), **schemas.errors(401, 403, 404, 429)},
        tags=["openai"],
    )
    async def get(self, request: Request, model_id: str) -> Response:
        try:
            panel = await resolve_panel(principal=principal_of(request), panel_id=model_id)
        except PanelNotFound:
            return model_not_found(model_id)
        return Response(chunks.model_object(panel))


def refusal(exc: ConversationError) -> Response:
    """A start refused by the services, in OpenAI's shape."""
    extra = getattr(exc, "extra", {})
    headers = {"Retry-After": str(int(extra["retry_after"]))} if extra.get("retry_after") else None
    if exc.status_code == 429:
        return openai_error(
            429, str(exc), type="insufficient_quota", code="insufficient_quota", headers=headers
        )
    if exc.code == "budget_too_small":
        return openai_error(422, str(exc), param="max_tokens", code="budget_too_small")
    return openai_error(exc.status_code, str(exc), code=exc.code)


class ChatCompletionsView(OpenAIView):
    permission_classes = [CanWrite]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """As /chat: the request thread's connection goes back to the pool after the checks."""
        super().initial(request, *args, **kwargs)
        release_connection()

    @extend_schema(
        operation_id="v1_chat_completions",
        summary="Ask a panel (model = panel id); streamed as chat.completion.chunk with stream: true",
        description=schemas.COMPLETIONS_DESCRIPTION,
        request=schemas.COMPLETION_REQUEST,
        extensions={"x-body-required": True},
        responses={
            200: OpenApiResponse(schemas.COMPLETION, description=schemas.STREAM_DESCRIPTION),
            **schemas.errors(400, 401, 403, 404, 413, 415, 422, 429, 503),
        },
        tags=["openai"],
    )
    async def post(self, request: Request) -> Response | StreamingHttpResponse:
        try:
            asked = parse(request.data)
        except RequestRefused as exc:
            return openai_error(400, str(exc), param=exc.param, code=exc.code)
        principal = principal_of(request)
        try:
            options = await start_options(
                principal=principal,
                panel_id=asked.model,
                temperature=asked.temperature,
                instructions=asked.instructions,
            )
        except PanelNotFound:
            return model_not_found(asked.model)
        tags = {**options.pop("tags"), "user": asked.user, "surface": "openai"}
        try:
            conversation, exchange = await conversation_start(
                principal=principal,
                message=asked.question,
                max_tokens=asked.max_tokens,
                running=True,
                tags=tags,
                **options,
            )
        except ConversationError as exc:
            return refusal(exc)
        run = asyncio.get_running_loop().create_task(
            conversation_run(
                conversation_id=conversation.pk,
                exchange=exchange,
                stream_when_watched=not asked.stream,
                fresh=conversation,
                question=asked.question,
            ),
            context=contextvars.Context(),
        )
        _RUNNING.add(run)
        run.add_done_callback(_RUNNING.discard)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if asked.stream:
            return self.streamed(asked, conversation, exchange, run, completion_id, created)
        finished = await asyncio.shield(run)
        body = await achat_result(finished, exchange)
        if finished.status == "failed":
            retry = finished.metadata.get("retry_after") or 10
            return openai_error(
                503,
                f"The panel could not answer: {finished.error}",
                type="server_error",
                code="agents_unavailable",
                headers={"Retry-After": str(int(retry))},
            )
        return Response(
            chunks.completion(body, completion_id=completion_id, created=created, panel=asked.model)
        )

    @staticmethod
    def streamed(
        asked: CompletionRequest, conversation: Any, exchange: int, run: Any, completion_id: str, created: int
    ) -> StreamingHttpResponse:
        writer = chunks.ChunkWriter(completion_id=completion_id, created=created, panel=asked.model)
        body = completion_stream(
            conversation=conversation,
            exchange=exchange,
            run=run,
            writer=writer,
            panel=asked.model,
            include_usage=asked.include_usage,
        )
        response = StreamingHttpResponse(body, content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
