"""OpenAssistant conversations from the message-tree export and from the flat Hub message table.

Two layouts of the same messages:
  - the tree export (`2023-04-12_oasst_all.trees.jsonl.gz`, `*_ready.trees.jsonl.gz`, oasst2's
    likewise): one tree a line, `{message_tree_id, tree_state, prompt: {message_id, role, text,
    lang, deleted, labels: {name: {value, count}}, replies: [...]}}`;
  - the flat table of `OpenAssistant/oasst1` and `oasst2` on the Hub: one message a row with
    `message_id`, `parent_id`, `message_tree_id`, `tree_state`, `role`, `text`, `lang`, `deleted`
    and `labels: {name: [...], value: [...], count: [...]}`.

Both become the same nodes, and every root-to-leaf path of two or more turns becomes one
`Conversation`. An assistant turn's labels quality, toxicity, humor and creativity (a mean in 0-1
and how many people gave it) become 0-4 attributes as NeMo-Aligner's
`preprocess_openassistant_data.py` makes them: Python's `round(value * 4)`, which rounds half to
even (0.625 -> 2, 0.875 -> 4). An assistant turn without `labels` has no attributes (None); one
whose labels hold none of the four has `{}`. User turns carry none. The raw labels stay in the
conversation's `meta["labels"]`, one entry a turn.

`OasstOptions()` keeps what NeMo-Aligner keeps: every language, deleted messages, every tree
state, any label count. A tree that breaks the format (a reply whose role does not alternate, a
missing text, a label outside 0-1) raises `TreeError` naming the message and the field; callers
turn it into a reject. Nothing here reads files: `helpsteer_core.conversation_sources` does, so
that the same functions run in one process or in Ray Data tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from helpsteer_core.attributes import NEMO_ATTRIBUTES
from helpsteer_core.config import StrictModel
from helpsteer_core.conversation import DEFAULT_SYSTEM, Conversation, Turn

OASST_ATTRIBUTES: tuple[str, ...] = NEMO_ATTRIBUTES[:4]
LIKERT_HIGH = 4  # OpenAssistant's 0-1 means become 0..LIKERT_HIGH
OASST_ROLES = {"prompter": "User", "assistant": "Assistant"}
FLAT_COLUMNS = ("message_id", "parent_id", "message_tree_id", "role", "text")


class OasstOptions(StrictModel):
    """Which OpenAssistant messages to read. The defaults keep everything, as NeMo-Aligner does."""

    languages: tuple[str, ...] = ()  # the tree's language (its first message's `lang`); () keeps all
    drop_deleted: bool = False  # drop messages marked deleted, and the replies below them
    tree_states: tuple[str, ...] = ()  # e.g. ("ready_for_export",); () keeps every state
    min_label_count: int = Field(default=0, ge=0)  # a label given by fewer people counts as missing


class TreeError(ValueError):
    """A message tree that breaks the export format; `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Node:
    """One message, checked, with its replies in the order the source gives them."""

    message_id: str
    role: str  # "User" or "Assistant"
    text: str
    lang: str
    deleted: bool
    labels: Mapping[str, Mapping[str, float]] | None  # {name: {"value", "count"}}
    replies: tuple[Node, ...]


@dataclass(frozen=True)
class Tree:
    tree_id: str
    state: str
    root: Node


def to_attribute_value(value: float) -> int:
    """An OpenAssistant 0-1 mean as a 0-4 value: NeMo-Aligner's `round(value * 4)`, half to even."""
    return round(value * LIKERT_HIGH)


# --- Checking messages ---------------------------------------------------------------------------


def _message_field(message: Mapping[str, Any], key: str, message_id: str) -> Any:
    if key not in message or message[key] is None:
        raise TreeError(key, f"message {message_id}: {key} is missing")
    return message[key]


def _check_labels(raw: Any, message_id: str) -> dict[str, dict[str, float]] | None:
    """Labels as {name: {value, count}}, from either layout; values must be means in 0-1."""
    if raw is None:
        return None
    if isinstance(raw, Mapping) and set(raw) >= {"name", "value", "count"} and isinstance(raw["name"], list):
        names, values, counts = raw["name"], raw["value"], raw["count"]
        if not (
            isinstance(values, list) and isinstance(counts, list) and len(names) == len(values) == len(counts)
        ):
            raise TreeError("labels", f"message {message_id}: name, value and count lists differ in length")
        raw = {n: {"value": v, "count": c} for n, v, c in zip(names, values, counts, strict=True)}
    if not isinstance(raw, Mapping):
        raise TreeError(
            "labels", f"message {message_id}: expected {{name: {{value, count}}}}, found {raw!r:.60}"
        )
    labels: dict[str, dict[str, float]] = {}
    for name, entry in raw.items():
        value = entry.get("value") if isinstance(entry, Mapping) else None
        count = entry.get("count", 0) if isinstance(entry, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise TreeError(
                f"labels.{name}",
                f"message {message_id}: value {value!r} is outside the range; allowed: a number in 0..1",
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise TreeError(
                f"labels.{name}", f"message {message_id}: count {count!r}; allowed: an integer >= 0"
            )
        labels[str(name)] = {"value": float(value), "count": count}
    return labels


def _node(message: Mapping[str, Any], replies: tuple[Node, ...], parent_role: str | None) -> Node:
    """Check one message (its replies are checked already) against its parent's role."""
    message_id = str(message.get("message_id") or "?")
    raw_role = _message_field(message, "role", message_id)
    if raw_role not in OASST_ROLES:
        raise TreeError("role", f"message {message_id}: role {raw_role!r}; allowed: {', '.join(OASST_ROLES)}")
    role = OASST_ROLES[raw_role]
    expected = "User" if parent_role in (None, "Assistant") else "Assistant"
    if role != expected:
        where = "the first message" if parent_role is None else f"a reply to a {parent_role} message"
        raise TreeError(
            "role",
            f"message {message_id}: {raw_role} as {where}; roles must alternate, starting with prompter",
        )
    text = _message_field(message, "text", message_id)
    if not isinstance(text, str) or not text.strip():
        raise TreeError("text", f"message {message_id}: text {text!r:.40}; allowed: a non-empty string")
    return Node(
        message_id=message_id,
        role=role,
        text=text,
        lang=str(message.get("lang") or ""),
        deleted=bool(message.get("deleted", False)),
        labels=_check_labels(message.get("labels"), message_id),
        replies=replies,
    )


def tree_from_export(tree: Mapping[str, Any]) -> Tree:
    """A line of the tree export, checked; raises `TreeError` on the first problem."""
    if not isinstance(tree, Mapping):
        raise TreeError("line", f"expected a JSON object, found {type(tree).__name__}")
    tree_id = str(tree.get("message_tree_id") or "")
    if not tree_id:
        raise TreeError("message_tree_id", "missing; every line of a trees file is one message tree")
    prompt = tree.get("prompt")
    if not isinstance(prompt, Mapping):
        raise TreeError("prompt", f"tree {tree_id}: the first message (`prompt`) is missing")

    def build(message: Mapping[str, Any], parent_role: str | None) -> Node:
        role = OASST_ROLES.get(message.get("role", ""), "")
        replies = message.get("replies") or []
        if not isinstance(replies, list) or not all(isinstance(r, Mapping) for r in replies):
            raise TreeError("replies", f"message {message.get('message_id')}: expected a list of messages")
        children = tuple(build(reply, role or None) for reply in replies) if role else ()
        return _node(message, children, parent_role)

    return Tree(tree_id, str(tree.get("tree_state") or ""), build(prompt, None))


def tree_from_messages(messages: Sequence[Mapping[str, Any]]) -> Tree:
    """One tree's rows of the flat table (any order; replies keep the rows' order), checked."""
    for column in FLAT_COLUMNS:
        if column not in messages[0]:
            raise TreeError(column, f"column missing; the flat message table needs {', '.join(FLAT_COLUMNS)}")
    tree_id = str(messages[0]["message_tree_id"])
    by_parent: dict[str | None, list[Mapping[str, Any]]] = {}
    ids = set()
    for message in messages:
        message_id = str(_message_field(message, "message_id", "?"))
        if message_id in ids:
            raise TreeError("message_id", f"message {message_id} appears twice in tree {tree_id}")
        ids.add(message_id)
        parent = message.get("parent_id")
        by_parent.setdefault(None if parent is None else str(parent), []).append(message)
    roots = by_parent.get(None, [])
    if len(roots) != 1:
        raise TreeError(
            "parent_id", f"tree {tree_id}: {len(roots)} messages without a parent_id; allowed: exactly 1"
        )
    for parent in by_parent:
        if parent is not None and parent not in ids:
            orphan = by_parent[parent][0].get("message_id")
            raise TreeError("parent_id", f"message {orphan}: parent_id {parent} is not in tree {tree_id}")

    def build(message: Mapping[str, Any], parent_role: str | None) -> Node:
        role = OASST_ROLES.get(message.get("role", ""), "")
        replies = by_parent.get(str(message["message_id"]), [])
        children = tuple(build(reply, role or None) for reply in replies) if role else ()
        return _node(message, children, parent_role)

    root = roots[0]
    return Tree(tree_id, str(root.get("tree_state") or ""), build(root, None))


# --- From a tree to conversations ----------------------------------------------------------------


def skip_reason(tree: Tree, options: OasstOptions) -> tuple[str, str] | None:
    """Which option leaves a whole tree out, and why (None: the options keep it)."""
    if options.tree_states and tree.state not in options.tree_states:
        return "tree_states", f"tree_state {tree.state!r} is not one of {', '.join(options.tree_states)}"
    if options.languages and tree.root.lang not in options.languages:
        return "languages", f"language {tree.root.lang!r} is not one of {', '.join(options.languages)}"
    if options.drop_deleted and tree.root.deleted:
        return "drop_deleted", "its first message is deleted"
    return None


def _attributes(node: Node, options: OasstOptions) -> dict[str, int] | None:
    if node.role != "Assistant" or node.labels is None:
        return None
    return {
        name: to_attribute_value(node.labels[name]["value"])
        for name in OASST_ATTRIBUTES
        if name in node.labels and node.labels[name]["count"] >= options.min_label_count
    }


def _paths(node: Node, options: OasstOptions) -> list[list[Node]]:
    """Every root-to-leaf path below `node` (deleted messages pruned when asked), in reply order."""
    replies = [r for r in node.replies if not (options.drop_deleted and r.deleted)]
    if not replies:
        return [[node]]
    return [[node, *path] for reply in replies for path in _paths(reply, options)]


def conversations(tree: Tree, options: OasstOptions, system: str = DEFAULT_SYSTEM) -> list[Conversation]:
    """The tree's root-to-leaf paths of two or more turns, as conversations, in reply order."""
    if skip_reason(tree, options) is not None:
        return []
    found = []
    for path in _paths(tree.root, options):
        if len(path) < 2:
            continue  # a prompt nobody answered is not a conversation
        turns = tuple(Turn(node.role, node.text, _attributes(node, options)) for node in path)
        meta = {
            "source": "oasst",
            "message_tree_id": tree.tree_id,
            "tree_state": tree.state,
            "lang": tree.root.lang,
            "message_ids": [node.message_id for node in path],
            "labels": [None if node.labels is None else dict(node.labels) for node in path],
        }
        found.append(Conversation(turns, system=system, meta=meta))
    return found
