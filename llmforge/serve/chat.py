"""The conversation behind `llmforge chat`: history, `/reset`, `/system TEXT`, `/history`, streaming answers.

Library code never prints: ``ChatSession`` writes through the ``write`` callable the CLI gives it, and talks
to any OpenAI-compatible server through the official client, so the same loop works against the project's
own gateway or a remote endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /history, /exit"


class ChatSession:
    def __init__(
        self,
        client: Any,
        model: str,
        write: Callable[[str], Any],
        *,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ):
        self.client = client
        self.model = model
        self.write = write
        self.system = system
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def handle(self, line: str) -> bool:
        """Act on one line the user typed; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text in ("/exit", "/quit"):
            return False
        if text == "/reset":
            self.history.clear()
            self.write("(conversation reset)\n")
            return True
        if text == "/system" or text.startswith("/system "):
            self.system = text[len("/system") :].strip() or None
            self.write(f"(system prompt {'set' if self.system else 'cleared'})\n")
            return True
        if text == "/history":
            for m in self.messages():
                self.write(f"[{m['role']}] {m['content']}\n")
            return True
        if text in ("/help", "/?"):
            self.write(HELP + "\n")
            return True
        if text.startswith("/") and " " not in text:
            self.write(f"unknown command {text}; {HELP}\n")
            return True
        self.ask(text)
        return True

    def ask(self, text: str) -> str:
        """Send a user turn, stream the answer through ``write``, keep both in the history."""
        self.history.append({"role": "user", "content": text})
        kw: dict[str, Any] = {}
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        parts: list[str] = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=self.messages(), stream=True, **kw
            )
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        self.write(choice.delta.content)
                    if choice.finish_reason == "length":
                        self.write(" […]")
                    elif choice.finish_reason == "content_filter":
                        self.write(" [stopped by the safety filter]")
        except Exception as e:  # the server's error, shown; the turn is dropped so it can be retried
            self.history.pop()
            self.write(f"\n(error: {getattr(e, 'message', None) or e})\n")
            return ""
        self.write("\n")
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        return answer
