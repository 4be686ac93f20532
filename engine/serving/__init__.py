"""Serving: the OpenAI-compatible HTTP server for one model folder.

Owns ``server`` (the settings and flags, building the app, ``run_serve``), ``routes``
(the endpoints, request -> generation settings, a client that hangs up),
``openai_wire`` (the API's request and response shapes), ``job_queue`` (the thread
that owns the model and runs requests), ``jobs`` (a request's job and its events),
``batching`` (the requests being answered, one forward pass for all), ``api_guard``
(API key, body size, the error shape), ``chat_page`` (the browser chat page at ``/``,
``chat_page.html``) and ``listening`` (sockets, and a server as a child process). May
import every package above it except ``training`` and ``export``.
"""
