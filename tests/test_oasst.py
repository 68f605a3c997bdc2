"""OpenAssistant readers: the tree export and the flat Hub message table give the same
conversations; labels become 0-4 values half to even; the options leave out what they name, counted;
a bad tree is a reject with its file, line, field and allowed values, never a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from shared_data import shared_file

from helpsteer_core.conversation_sources import ReadOptions, read_source
from helpsteer_core.oasst import OasstOptions, conversations, to_attribute_value, tree_from_export

FIXTURE = "oasst/fixture_a.trees.jsonl"


def read(source: Path | str, **options: Any) -> tuple[list, dict[str, Any], list]:
    """Conversations, counts and unit results of a source, read in this process."""
    found = read_source(str(source), ReadOptions.model_validate(options))
    return found.conversations, found.counts, list(found.results)


def trees(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def walk(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [message] + [m for reply in message["replies"] for m in walk(reply)]


def leaf_paths(message: dict[str, Any]) -> list[list[dict[str, Any]]]:
    if not message["replies"]:
        return [[message]]
    return [[message, *p] for reply in message["replies"] for p in leaf_paths(reply)]


def test_every_root_to_leaf_path_of_two_turns_is_a_conversation_with_its_own_labels() -> None:
    fixture = shared_file(FIXTURE)
    found, counts, _ = read(fixture)
    expected_paths = [p for t in trees(fixture) for p in leaf_paths(t["prompt"]) if len(p) >= 2]
    assert len(found) == len(expected_paths) == 60
    assert counts["units"] == counts["kept"] == 10 and counts["conversations"] == 60
    for conversation, path in zip(found, expected_paths, strict=True):
        assert conversation.meta["message_ids"] == [m["message_id"] for m in path]
        assert [t.text for t in conversation.turns] == [m["text"] for m in path]
        for turn, message in zip(conversation.turns, path, strict=True):
            assert turn.role == {"prompter": "User", "assistant": "Assistant"}[message["role"]]
            if turn.role == "User" or "labels" not in message:
                assert turn.attributes is None  # user labels are never attributes
                continue
            expected = {
                name: round(message["labels"][name]["value"] * 4)
                for name in ("quality", "toxicity", "humor", "creativity")
                if name in message["labels"]
            }
            assert turn.attributes == expected


def test_labels_round_half_to_even_as_nemo_aligner_does() -> None:
    assert [to_attribute_value(v) for v in (0.125, 0.375, 0.625, 0.875, 0.5833333333333334, 1.0)] == [
        0,
        2,
        2,
        4,
        2,
        4,
    ]
    fixture = shared_file(FIXTURE)
    found, _, _ = read(fixture)
    # The first tree's first answer: quality 0.375 -> 2 (1.5 rounds to even), humor 0.875 -> 4 (3.5).
    first = found[0].turns[1]
    assert first.attributes == {"quality": 2, "toxicity": 4, "humor": 4, "creativity": 2}


def test_options_leave_out_what_they_name_and_count_it() -> None:
    fixture = shared_file(FIXTURE)
    all_trees = trees(fixture)
    everything, _, _ = read(fixture)

    english, counts, _ = read(fixture, oasst={"languages": ["en"]})
    not_english = sum(1 for t in all_trees if t["prompt"]["lang"] != "en")
    assert not_english >= 1 and counts["filtered_by"] == {"languages": not_english}
    assert english and all(c.meta["lang"] == "en" for c in english) and len(english) < len(everything)

    ready, counts, _ = read(fixture, oasst={"tree_states": ["ready_for_export"]})
    aborted = sum(1 for t in all_trees if t["tree_state"] != "ready_for_export")
    assert aborted >= 1 and counts["filtered_by"] == {"tree_states": aborted}
    assert all(c.meta["tree_state"] == "ready_for_export" for c in ready)

    deleted_ids = {m["message_id"] for t in all_trees for m in walk(t["prompt"]) if m["deleted"]}
    assert deleted_ids, "the fixture has deleted messages"
    kept, _, _ = read(fixture, oasst={"drop_deleted": True})
    assert len(kept) < len(everything)
    assert not any(set(c.meta["message_ids"]) & deleted_ids for c in kept)
    # Kept conversations are exactly the paths with no deleted message (a path cut short at a
    # deleted reply ends at its parent, which may then be a leaf of its own).
    assert {
        tuple(c.meta["message_ids"]) for c in everything if not set(c.meta["message_ids"]) & deleted_ids
    } <= {tuple(c.meta["message_ids"]) for c in kept}

    counted, _, _ = read(fixture, oasst={"min_label_count": 3})
    for conversation in counted:
        for turn, labels in zip(conversation.turns, conversation.meta["labels"], strict=True):
            if turn.attributes is not None:
                assert all(labels[name]["count"] >= 3 for name in turn.attributes)
    assert [c.turns for c in counted] != [c.turns for c in everything]


def _bad_trees(fixture: Path) -> list[str]:
    """The fixture's first tree, broken four ways, one per line, after one good tree."""
    good = trees(fixture)[0]

    def broken(change) -> str:
        tree = json.loads(json.dumps(good))
        change(tree)
        return json.dumps(tree)

    def same_roles(tree):
        tree["prompt"]["replies"][0]["role"] = "prompter"

    def no_text(tree):
        del tree["prompt"]["replies"][1]["text"]

    def out_of_range(tree):
        tree["prompt"]["replies"][0]["labels"]["quality"]["value"] = 1.5

    def unknown_role(tree):
        tree["prompt"]["role"] = "moderator"

    return [
        json.dumps(good),
        broken(same_roles),
        broken(no_text),
        broken(out_of_range),
        broken(unknown_role),
        "{oops",
    ]


def test_bad_trees_are_rejects_with_file_line_field_and_allowed_values(tmp_path: Path) -> None:
    source = tmp_path / "bad.trees.jsonl"
    source.write_text("\n".join(_bad_trees(shared_file(FIXTURE))) + "\n")
    first_tree = trees(shared_file(FIXTURE))[0]["message_tree_id"]
    found, counts, results = read(source, input_format="oasst-trees")
    rejected = {r.input_line: r for r in results if r.status == "rejected"}
    assert counts["kept"] == 1 and counts["rejected"] == 5 and counts["units"] == 6 and counts["reconciles"]
    assert found and all(c.meta["message_tree_id"] == first_tree for c in found)
    assert rejected[2].field == "role" and "roles must alternate" in rejected[2].reason
    assert rejected[3].field == "text" and "missing" in rejected[3].reason
    assert rejected[4].field == "labels.quality" and "allowed: a number in 0..1" in rejected[4].reason
    assert rejected[5].field == "role" and "allowed: prompter, assistant" in rejected[5].reason
    assert rejected[6].field == "line"
    record = rejected[3].reject_record()
    assert record["input_file"] == str(source) and record["input_line"] == 3 and record["raw"]


def hub_rows(fixture: Path) -> list[dict[str, Any]]:
    """The fixture's messages as the Hub's flat table has them: one row a message, breadth first
    (parents before replies), labels as {name: [...], value: [...], count: [...]}."""
    rows = []
    for tree in trees(fixture):
        queue = [(tree["prompt"], None)]
        while queue:
            message, parent = queue.pop(0)
            labels = message.get("labels")
            rows.append(
                {
                    "message_id": message["message_id"],
                    "parent_id": parent,
                    "user_id": "u",
                    "text": message["text"],
                    "role": message["role"],
                    "lang": message["lang"],
                    "review_count": message["review_count"],
                    "review_result": message["review_result"],
                    "deleted": message["deleted"],
                    "rank": message["rank"],
                    "synthetic": message["synthetic"],
                    "model_name": message["model_name"],
                    "message_tree_id": tree["message_tree_id"],
                    "tree_state": tree["tree_state"],
                    "labels": None
                    if labels is None
                    else {
                        "name": list(labels),
                        "value": [v["value"] for v in labels.values()],
                        "count": [v["count"] for v in labels.values()],
                    },
                }
            )
            queue.extend((reply, message["message_id"]) for reply in message["replies"])
    return rows


def write_hub_folder(root: Path, rows: list[dict[str, Any]]) -> Path:
    """A folder laid out like the OpenAssistant/oasst1 dataset repo on the Hub."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# oasst1 (test copy)\n")
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-00000-of-00001.parquet")
    return root


def test_flat_message_table_and_tree_export_give_the_same_conversations(tmp_path: Path) -> None:
    fixture = shared_file(FIXTURE)
    folder = write_hub_folder(tmp_path / "oasst1", hub_rows(fixture))
    from_trees, tree_counts, _ = read(fixture)
    for options in ({}, {"oasst": {"drop_deleted": True, "languages": ["en"], "min_label_count": 2}}):
        expected, _, _ = read(fixture, **options)
        from_table, counts, _ = read(folder, **options)
        assert counts["input_rows"] == len(hub_rows(fixture)) == 107 and counts["units"] == 10
        assert [(c.turns, c.system, c.meta) for c in from_table] == [
            (c.turns, c.system, c.meta) for c in expected
        ]
    assert len(from_trees) == tree_counts["conversations"] == 60


def test_flat_table_through_datasets_like_a_hub_id(tmp_path: Path) -> None:
    """`hf:FOLDER` loads the folder as `datasets.load_dataset` loads the Hub repo."""
    fixture = shared_file(FIXTURE)
    folder = write_hub_folder(tmp_path / "oasst1", hub_rows(fixture))
    from_table, counts, _ = read(f"hf:{folder}")
    expected, _, _ = read(fixture)
    assert counts["units"] == 10 and [c.turns for c in from_table] == [c.turns for c in expected]


def test_flat_table_tree_with_a_missing_parent_is_one_reject_naming_its_rows(tmp_path: Path) -> None:
    fixture = shared_file(FIXTURE)
    rows = hub_rows(fixture)
    second_tree = rows[[r["parent_id"] is None for r in rows].index(True, 1)]["message_tree_id"]
    broken = next(r for r in rows if r["message_tree_id"] == second_tree and r["parent_id"] is not None)
    broken["parent_id"] = "no-such-message"
    folder = write_hub_folder(tmp_path / "oasst1", rows)
    found, counts, results = read(folder)
    rejected = [r for r in results if r.status == "rejected"]
    assert counts["rejected"] == 1 and counts["kept"] == 9 and counts["input_rows"] == len(rows)
    assert rejected[0].field == "parent_id" and "no-such-message" in rejected[0].reason
    assert "lines" in rejected[0].reason
    assert all(c.meta["message_tree_id"] != second_tree for c in found)


def test_tree_functions_need_no_files() -> None:
    tree = {
        "message_tree_id": "t",
        "tree_state": "ready_for_export",
        "prompt": {
            "message_id": "a",
            "role": "prompter",
            "text": "Hi?",
            "lang": "en",
            "replies": [
                {
                    "message_id": "b",
                    "role": "assistant",
                    "text": "Hello.",
                    "replies": [],
                    "labels": {"spam": {"value": 0.0, "count": 1}},
                }
            ],
        },
    }
    (conversation,) = conversations(tree_from_export(tree), OasstOptions())
    assert conversation.turns[1].attributes == {}  # labelled, but none of the four: NeMo's empty label
