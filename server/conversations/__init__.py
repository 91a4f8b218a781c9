"""Stored responses for stateful chats (`/api/v1/chat` and `/v1/responses` share them).

Every stored response is a node: its id (`resp_<48 hex>`), its parent's id, the model, the
OpenAI-format messages that turn added (the user input and the assistant output, reasoning
included) and when it was created. A conversation is rebuilt by walking parents to the root, so
any earlier response can be continued, and two continuations of one id are independent branches.

    store = ConversationStore(lmkube_home() / "conversations")
    parent = store.get(previous_id)            # None if unknown
    history = store.history(previous_id)       # every message from the root to that node
    node = store.add(parent_id=..., model=..., messages=[...])
"""

from .store import ConversationNode, ConversationStore, is_response_id, new_response_id

__all__ = ["ConversationNode", "ConversationStore", "is_response_id", "new_response_id"]
