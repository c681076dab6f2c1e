"""The two-model assistant (pocketvlm/assistant.py) on tiny random models: one definition (JSON or Python),
one look per image, the memory policies (and `pocketvlm fit` of them), the description in every front end,
and each bad input with its error. Peak memory of both policies vs the estimate: tests/test_assistant_memory.py."""
from __future__ import annotations

import io
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_tiny_llava, make_tiny_qwen2  # noqa: E402

import pocketvlm  # noqa: E402
from pocketvlm.assistant import Assistant, AssistantConfig, AssistantWarning  # noqa: E402
from pocketvlm.errors import AssistantError, ConfigError, ImageError, ModelNotFoundError  # noqa: E402

GREEDY = dict(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("assistant")
    return {"vlm": make_tiny_llava(d / "llava"), "llm": make_tiny_qwen2(d / "qwen", max_position_embeddings=2048),
            "root": d}


@pytest.fixture(scope="module")
def asst(dirs):
    return Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]))


def image(color=(200, 30, 30), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def turn(text, *images):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": i}} for i in images]
            + [{"type": "text", "text": text}]}


def prompt_text(a, prompt) -> str:
    return a.chat_model().tokenizer.decode(prompt.ids)


def test_json_definition_equals_python_arguments_and_streams(asst, dirs):
    spec = {"vision": "llava", "chat": "qwen", "memory": "resident", "vision_options": {"max_tokens": 8},
            "describe_prompt": "Look closely. {question}", "context_template": "Seen: {descriptions}"}
    path = dirs["root"] / "pocket.json"
    path.write_text(json.dumps(spec))  # relative paths: from the file's folder
    a = pocketvlm.load(path)
    assert isinstance(a, Assistant) and a.name == "pocket" and a.config.vision == str(dirs["vlm"])
    b = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]), vision_options={"max_tokens": 8},
                  describe_prompt="Look closely. {question}", context_template="Seen: {descriptions}")
    msgs = [turn("What is here?", image())]
    assert a.chat(msgs, **GREEDY) == b.chat(msgs, **GREEDY)
    assert "".join(a.chat(msgs, stream=True, **GREEDY)) == a.chat(msgs, **GREEDY)
    assert a.info()["memory"] == "resident" and a.is_vlm


def test_looks_once_per_image_and_text_turns_go_straight_to_the_chat_model(dirs):
    a = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]))
    img = image()
    msgs = [turn("What is here?", img)]
    first = a.chat(msgs, **GREEDY)
    assert a.looks == 1 and a.last_info()["descriptions"][0]["cached"] is False
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And what colour is it?"}]
    a.chat(msgs, **GREEDY)
    assert a.looks == 1 and a.last_info()["descriptions"][0]["cached"] is True  # follow-up: no new look
    buf = io.BytesIO()
    img.save(buf, "PNG")
    a.chat([turn("What is here?", buf.getvalue())], **GREEDY)  # same pixels, other source: same key
    assert a.looks == 1
    a.chat(msgs, look_again=True, **GREEDY)  # a new look asked for: the latest question goes to the VLM
    assert a.looks == 2 and a.last_info()["descriptions"][0]["question"] == "And what colour is it?"
    a.chat(msgs, look_again=True, **GREEDY)
    assert a.looks == 2
    text_only = [{"role": "user", "content": "Hello there"}]
    assert a.chat(text_only, **GREEDY) == a.chat_model().chat(text_only, **GREEDY)
    assert a.last_info()["descriptions"] == [] and a.looks == 2


def test_several_images_one_description_each_labelled_in_order(asst):
    before = asst.looks
    p = asst.chat_prompt([turn("Compare these.", image((255, 0, 0)), image((0, 0, 255), (20, 20)))])
    assert asst.looks - before == 2
    assert [d["image"] for d in p.extra["descriptions"]] == [1, 2]
    text = prompt_text(asst, p)
    first = text.index("Image 1: asked 'Compare these.', the vision model answered:")
    assert first < text.index("Image 2: asked") < text.index("[Image 1]") < text.index("[Image 2]")
    assert "You cannot see images yourself" in text  # the context block is system-side, before the user turn


def test_sequential_policy_gives_the_same_answer_with_one_model_at_a_time(dirs, asst):
    s = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]), memory="sequential")
    assert s._vision is None and s._chat is not None
    msgs = [turn("What is here?", image((10, 200, 10)))]
    assert s.chat(msgs, **GREEDY) == asst.chat(msgs, **GREEDY)
    assert s._vision is None and s.loads == {"vision": 1, "chat": 2}  # loaded to look, freed for the answer
    s.chat(msgs + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more?"}], **GREEDY)
    assert s.loads == {"vision": 1, "chat": 2}  # a cached description needs no model swap
    assert s.max_slots == 1 and asst.max_slots > 1


def test_fit_sums_resident_and_takes_the_larger_model_for_sequential(dirs, capsys):
    from pocketvlm.cli import main
    from pocketvlm.package.memory import RUNTIME_BYTES, estimate_assistant, transient_bytes

    est = {}
    for policy in ("resident", "sequential"):
        path = dirs["root"] / f"fit-{policy}.json"
        path.write_text(json.dumps({"vision": str(dirs["vlm"]), "chat": str(dirs["llm"]), "memory": policy}))
        est[policy] = estimate_assistant(path)
    parts = est["resident"]["parts"]
    v, c = parts["vision"]["bytes"]["total"], parts["chat"]["bytes"]["total"]
    # one process: one runtime, and one model's working set at a time
    both = min(transient_bytes(parts["vision"]["bytes"]), transient_bytes(parts["chat"]["bytes"]))
    assert est["resident"]["bytes"]["total"] == v + c - RUNTIME_BYTES - both > max(v, c)
    assert est["sequential"]["bytes"]["total"] == max(v, c)
    assert main(["fit", str(dirs["root"] / "fit-sequential.json"), "--device", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == max(v, c) and out["models"][0]["memory"] == "sequential"


# --- every front end ----------------------------------------------------------------------------------

def test_engine_and_server_serve_an_assistant_with_its_description(asst, dirs, tmp_path):
    import httpx

    from pocketvlm.serve.app import ServerThread, create_app
    from serve_common import data_url, png_bytes

    engine = pocketvlm.Engine({"pocket": asst}, slots=2)
    try:
        path = tmp_path / "red.png"
        image().save(path)
        r = engine.chat.completions.create(model="pocket", messages=[turn("What is it?", str(path))], **GREEDY)
        d = r.model_dump()["pocketvlm"]["descriptions"]
        assert len(d) == 1 and d[0]["description"] and d[0]["image"] == 1
        chunks = list(engine.chat.completions.create(model="pocket", messages=[turn("What is it?", str(path))],
                                                     stream=True, **GREEDY))
        assert chunks[0].model_dump()["pocketvlm"]["descriptions"][0]["cached"] is True
        with ServerThread(create_app(engine)) as s:
            models = httpx.get(s.url + "/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["pocket"] and models[0]["vision"] is True
            body = {"model": "pocket", "messages": [turn("What is it?", data_url(png_bytes(16, 16)))], **GREEDY}
            j = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60).json()
            assert j["pocketvlm"]["descriptions"][0]["description"] and j["choices"][0]["message"]["content"]
    finally:
        engine.close()
    seq = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]), memory="sequential")
    with pocketvlm.Engine({"seq": seq}, slots=4) as e:
        assert e.schedulers["seq"].n_slots == 1  # a look frees the chat model: one generation at a time
        r = e.chat.completions.create(model="seq", messages=[turn("What is it?", str(path))], **GREEDY)
        assert r.choices[0].message.content == asst.chat([turn("What is it?", str(path))], **GREEDY)


def test_cli_chat_with_vision_and_chat_shows_the_description(dirs, tmp_path, monkeypatch, capsys):
    from pocketvlm.cli import main

    path = tmp_path / "blue.png"
    image((0, 0, 255)).save(path)
    script = f"/image {path}\nWhat is it?\nAnd now?\n/look\nLook again?\n/image {tmp_path / 'nope.png'}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", "--vision", str(dirs["vlm"]), "--chat", str(dirs["llm"]), "--show-description",
                 "--temperature", "0", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"(image attached: {path})" in out
    assert len(re.findall(r"\[image 1, described \(\d+ ms\)", out)) == 2  # the first look and the /look one
    assert "[image 1, described (cached)" in out  # the follow-up
    assert "I couldn't use the image" in out  # the same path checks as any model
    assert main(["chat", str(dirs["llm"]), "--show-description"]) == 2
    assert "needs an assistant" in capsys.readouterr().err
    assert main(["chat", "--vision", str(dirs["vlm"])]) == 2
    assert "--chat" in capsys.readouterr().err


# --- bad input ----------------------------------------------------------------------------------------

def test_a_vision_model_that_cannot_see_is_an_error(dirs):
    for memory in ("resident", "sequential"):
        with pytest.raises(AssistantError, match="text-only"):
            Assistant(vision=str(dirs["llm"]), chat=str(dirs["llm"]), memory=memory)


def test_a_vlm_as_chat_model_is_allowed_and_gets_text_only(dirs):
    a = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["vlm"]))
    p = a.chat_prompt([turn("What is it?", image())])
    vlm = a.chat_model()
    assert p.n_images == 0 and vlm.model.image_token_id not in p.ids  # the description, never the image
    assert isinstance(a.chat([turn("What is it?", image())], **GREEDY), str)


def test_missing_model_path_is_an_error(dirs, tmp_path):
    for memory in ("resident", "sequential"):
        with pytest.raises(ModelNotFoundError):
            Assistant(vision=str(tmp_path / "no-such-vlm"), chat=str(dirs["llm"]), memory=memory)
        with pytest.raises(ModelNotFoundError):
            Assistant(vision=str(dirs["vlm"]), chat=str(tmp_path / "no-such-llm"), memory=memory)


def test_an_unreadable_image_never_reaches_the_chat_model(asst, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the chat model was called")

    monkeypatch.setattr(asst.chat_model(), "chat_prompt", boom)
    monkeypatch.setattr(asst.chat_model(), "run", boom)
    before = asst.looks
    with pytest.raises(ImageError):
        asst.chat([turn("What is it?", b"not an image at all")], **GREEDY)
    with pytest.raises(ImageError):
        asst.chat([turn("What is it?", image(), "/no/such/image.png")], **GREEDY)  # checked before any look
    assert asst.looks == before


def test_a_description_past_the_chat_context_is_cut_with_a_warning(dirs):
    a = Assistant(vision=str(dirs["vlm"]), chat=str(dirs["llm"]), chat_load={"context_window_size": 160},
                  vision_options={"max_tokens": 200}, context_template="{descriptions}")
    with pytest.warns(AssistantWarning, match="did not fit"):
        p = a.chat_prompt([turn("What is it?", image((1, 2, 3)))], max_tokens=8)
    assert "cut to fit" in prompt_text(a, p) and a.last_info()["warnings"]
    assert len(p.ids) + 8 <= 160
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AssistantWarning)
        assert isinstance(a.chat([turn("What is it?", image((1, 2, 3)))], temperature=0, max_tokens=8), str)


@pytest.mark.parametrize("bad, message", [
    ({"vision": "a"}, "needs chat"),
    ({"vision": "a", "chat": "b", "memory": "lazy"}, "memory must be"),
    ({"vision": "a", "chat": "b", "context_template": "no slot"}, "{descriptions}"),
    ({"vision": "a", "chat": "b", "colour": "red"}, "unknown assistant field"),
    ({"vision": "a", "chat": "b", "chat_options": {"beam": 4}}, "unknown option"),
])
def test_bad_definitions_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        AssistantConfig.from_dict(bad)


def test_sequential_needs_sources_not_loaded_models(asst):
    with pytest.raises(AssistantError, match="sources"):
        Assistant(vision=asst.vision_model(), chat=asst.chat_model(), memory="sequential")
