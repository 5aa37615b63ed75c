"""
Chat fine-tuning end to end: chat data from prepare.py with its loss mask, written whole or not at
all; train.py's loss on the assistant's tokens only, equal to a masked cross-entropy computed by
hand, no NaN from a batch without one, a base run's vocabulary grown for the chat tokens, exact
resume and DDP on chat data; sample.py --chat driven through stdin; evaluate.py chat's score.
"""

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare
from helpers import (ENV, REPO, TINY, assert_ddp_matches_single_process, assert_exact_resume,
                     assert_one_line_error, read_log, run_train)
from lib import chat, chat_data, cli, hardware, loading, tokenfiles, tokenizers
from lib.batches import Batches
from lib.tokenfiles import PrepareError

# the base run's text: every character the reversal task needs (letters, ':', ' ') and a few more
PANGRAMS = ("the quick brown fox jumps over a lazy dog", "pack my box with five dozen liquor jugs")
BASE_TEXT = "".join(f"reverse: {w} is {w[::-1]}.\n" for w in PANGRAMS) * 40
SFT = ['--eval_interval=2', '--dropout=0.0']  # with TINY: a 2-layer, 16-token model


def script(name, *args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, name, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          input=stdin, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny character-level run (its folder) trained 4 steps on BASE_TEXT."""
    root = tmp_path_factory.mktemp("base")
    (root / "text.txt").write_text(BASE_TEXT)
    prepare.prepare("text", input=str(root / "text.txt"), tokenizer="char", name="base_text", data_dir=root)
    proc = run_train(*TINY, f"--data_dir={root / 'base_text'}", "--dataset=base_text",
                     f"--out_dir={root / 'run'}", "--max_iters=4", "--eval_interval=4")
    assert proc.returncode == 0, proc.stderr
    return root / "run"


@pytest.fixture(scope="module")
def reverse_data(base_run, tmp_path_factory):
    """chat_reverse on the base run's characters: 300 training words, 20 held out."""
    root = tmp_path_factory.mktemp("chat")
    prepare.prepare("chat_reverse", base=str(base_run), num_train=300, num_val=20, data_dir=root)
    return root / "chat_reverse"


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def qa(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ----------------------------------------------------------------------------- prepare.py

def test_chat_data_is_tokens_and_a_mask_split_by_conversation(tmp_path, capsys):
    conversations = [qa(f"question {i}?", f"answer {i}.") for i in range(40)]
    conversations.append([{"role": "system", "content": "Be brief."}, *qa("short?", "ok"),
                          *qa("long " * 30, "fine")])  # 180 tokens: cut to 64, its first reply kept
    conversations.append(qa("very long " * 20, "lost"))  # its reply lies past the cut: skipped
    path = write_jsonl(tmp_path / "talk.jsonl", conversations)
    assert prepare.main(["chat", f"--input={path}", "--tokenizer=char", "--name=talk",
                         f"--data_dir={tmp_path}", "--max_tokens_per_conversation=64"]) == 0
    out, folder = capsys.readouterr().out, tmp_path / "talk"
    meta = tokenfiles.read_meta(folder)
    tok = tokenizers.chat_tokenizer(prepare.char_tokenizer(meta["chars"]))
    assert meta["chat"] == chat.chat_entry(tok) and meta["vocab_size"] == len(meta["chars"]) + 4
    train, val = chat.split_conversations(conversations)
    tokens, masks = {}, {}
    for split, convs in (("train", train), ("val", val)):
        tokens[split] = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
        masks[split] = np.fromfile(folder / f"{split}.mask.bin", dtype=np.uint8)
        kept, counts = chat.fit_to_block([chat.render(c, tok) for c in convs], 63)
        assert meta["conversations"][split] == counts and meta["splits"][split] == len(tokens[split])
        assert tokens[split].tolist() == [i for ids, _ in kept for i in ids]  # whole, in order
        assert masks[split].tolist() == [m for _, mask in kept for m in mask]
        assert meta["mask"]["learned"][split] == int(masks[split].sum())
    assert sum(c["cut"] for c in meta["conversations"].values()) == 1
    assert sum(c["skipped"] for c in meta["conversations"].values()) == 1
    assert "1 cut" in out and "1 skipped" in out and "max_tokens_per_conversation=64" in out
    # what the mask marks is the replies: decoded, the learned runs are answers and <|end|>s
    learned = tok.decode([int(t) for t, m in zip(tokens["train"], masks["train"]) if m])
    assert learned.startswith("answer ") and "question" not in learned and "<|user|>" not in learned
    # prepared: a second run does nothing; a changed --input is not replaced silently
    asked = {"input": str(path), "tokenizer": "char", "name": "talk", "data_dir": str(tmp_path),
             "max_tokens_per_conversation": "64"}
    assert "already prepared" in prepare.already_prepared("chat", asked)
    write_jsonl(path, conversations[1:])
    with pytest.raises(PrepareError, match="differs .*changed talk.jsonl.*--force"):
        prepare.already_prepared("chat", asked)


def test_a_bad_conversation_is_one_error_line_and_nothing_is_written(tmp_path, base_run):
    bad = write_jsonl(tmp_path / "bad.jsonl", [qa("reverse: abc", "cba")] * 2 + [qa("hi", "")[:1]])
    into = f"--data_dir={tmp_path / 'data'}"
    proc = script("prepare.py", "chat", f"--input={bad}", into, "--tokenizer=char")
    assert_one_line_error(proc, f"{bad}:3:", "no assistant message")
    # a character the base run never saw: named, with its file and line
    accents = write_jsonl(tmp_path / "accents.jsonl", [qa("reverse: abc", "cba")] * 3 + [qa("café", "éfac")])
    proc = script("prepare.py", "chat", f"--input={accents}", into, f"--base={base_run}")
    assert_one_line_error(proc, f"{accents}:4:", "'é'", "base")
    proc = script("prepare.py", "chat", f"--input={accents}", into, f"--base={base_run}", "--tokenizer=gpt2")
    assert_one_line_error(proc, "--base", "leave out --tokenizer")
    assert proc.returncode == 2
    assert not (tmp_path / "data").exists()  # no folder, no file


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "talk.jsonl", [qa(f"q{i}", f"a{i}") for i in range(20)])
    real = chat_data.write_tokens

    def failing(target, *args):
        if target.name == "val.mask.bin":
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) while the last file is written
        return real(target, *args)
    monkeypatch.setattr(chat_data, "write_tokens", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("chat", input=str(path), tokenizer="char", name="talk", data_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_chat_reverse_saves_its_held_out_questions(reverse_data):
    meta = tokenfiles.read_meta(reverse_data)
    questions = chat.read_conversations(reverse_data / meta["eval"]["file"])
    train, val = chat.reversal_task(300, 20, seed=1337)
    assert questions == val and meta["eval"]["questions"] == 20
    assert meta["conversations"]["train"]["kept"] == 300 and meta["tokenizer"] == "char"


def test_chitchat_without_its_package_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # import fails as if not installed
    assert prepare.main(["chitchat", f"--data_dir={tmp_path}"]) == 1
    assert capsys.readouterr().err.strip() == ("error: the chitchat corpus needs its package: "
                                               "pip install chitchat-dataset")


def test_the_mask_files_are_checked_before_training(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    np.arange(40, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(40, dtype=np.uint16).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 50, "mask": {"file": "SPLIT.mask.bin"}}))
    paths = {s: str(folder / f"{s}.bin") for s in ("train", "val")}
    ones = np.ones(40, dtype=np.uint8)
    ones.tofile(folder / "train.mask.bin")
    cases = [(None, "no .*val.mask.bin"), (ones[:39], "39 mask bytes but .* 40 tokens"),
             (ones * 2, "the value 2"), (ones * 0, "marks no token to learn")]
    for mask, problem in cases:
        if mask is not None:
            mask.tofile(folder / "val.mask.bin")
        with pytest.raises(PrepareError, match=problem):
            tokenfiles.check_dataset(folder, paths, 16, "d")
    ones.tofile(folder / "val.mask.bin")
    assert tokenfiles.check_dataset(folder, paths, 16, "d")[0] == {"train": 40, "val": 40}


# ----------------------------------------------------------------------------- train.py

def test_the_loss_is_the_masked_cross_entropy_of_the_grown_base(base_run, reverse_data, tmp_path):
    out = tmp_path / "sft"
    proc = run_train(*TINY, *SFT, f"--data_dir={reverse_data}", "--dataset=chat_reverse",
                     f"--init_from={base_run / 'ckpt.pt'}", f"--out_dir={out}", "--max_iters=1")
    assert proc.returncode == 0, proc.stderr
    meta = tokenfiles.read_meta(reverse_data)
    base_vocab = meta["vocab_size"] - 4
    assert "loss: on the assistant's tokens only" in proc.stdout
    assert f"vocabulary grows from {base_vocab} to {base_vocab + 4} ids" in proc.stdout
    assert f"next: python sample.py --out_dir={out} --chat\n" in proc.stdout  # the end points to chatting
    # the model the run started from: the base, grown; its batches, drawn as train.py draws them
    model = loading.load_model(str(base_run / "ckpt.pt"), "", "cpu")[0]
    chat.grow_vocab(model, meta["vocab_size"])
    dev = hardware.setup_device("cpu", "float32", verbose=False)
    batches = Batches(str(reverse_data), "chat_reverse", dev, seed=1337, batch_size=4, block_size=16,
                      accumulation=1, batch_warmup=0, seq_warmup=0, eval_iters=2)

    def masked_nll(split, offsets):  # (sum of -log p over the targets the mask marks 1, their count)
        tokens = np.fromfile(reverse_data / f"{split}.bin", dtype=np.uint16).astype(np.int64)
        mask = np.fromfile(reverse_data / f"{split}.mask.bin", dtype=np.uint8)
        rows = offsets[:, None] + np.arange(17)  # (B, T + 1)
        x, y = torch.from_numpy(tokens[rows[:, :-1]]), torch.from_numpy(tokens[rows[:, 1:]])
        with torch.no_grad():
            logits = model(x, y)[0].double()  # (B, T, V)
        nll = -F.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]  # (B, T)
        learn = torch.from_numpy(mask[rows[:, 1:]] == 1)
        return nll[learn].sum().item(), int(learn.sum())

    logged = {(kind, split, it): loss for it, kind, split, loss in read_log(out)}
    for split in ("train", "val"):
        sums = [masked_nll(split, batches.eval_offsets[split][k]) for k in range(2)]
        expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
        assert logged[("eval", split, 0)] == pytest.approx(expected, rel=1e-5)
    nll, n = masked_nll("train", batches.plan(0)[0][0])
    assert logged[("train", "train", 0)] == pytest.approx(nll / n, rel=1e-5)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["tokenizer"]["chat"] == meta["chat"]  # sample.py and evaluate.py rebuild the chat tokenizer
    assert ckpt["model_args"]["vocab_size"] == meta["vocab_size"]


def test_a_batch_without_an_assistant_token_gives_no_nan(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [qa("a" * 30, "b")] * 3 + [qa("a" * 31, "b")] * 3)
    prepare.prepare("chat", input=str(path), tokenizer="char", name="sparse", data_dir=tmp_path)
    out = tmp_path / "out"
    proc = run_train(*TINY, f"--data_dir={tmp_path / 'sparse'}", "--dataset=sparse", f"--out_dir={out}",
                     "--block_size=8", "--batch_size=2", "--eval_iters=10", "--max_iters=12",
                     "--eval_interval=6")
    assert proc.returncode == 0, proc.stderr
    losses = {kind: [loss for _, k, _, loss in read_log(out) if k == kind] for kind in ("train", "eval")}
    assert all(math.isfinite(x) for x in losses["train"] + losses["eval"]), losses
    assert 0.0 in losses["train"] and max(losses["train"]) > 0, losses  # some micro-batches had no target


def test_a_base_with_another_tokenizer_or_lora_is_refused(base_run, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [qa(f"reverse: {w}", w[::-1]) for w in ("abc", "dog", "fox")])
    prepare.prepare("chat", input=str(path), tokenizer="char", name="own", data_dir=tmp_path)  # its own chars
    proc = run_train(*TINY, f"--data_dir={tmp_path / 'own'}", "--dataset=own", f"--out_dir={tmp_path / 'o'}",
                     f"--init_from={base_run / 'ckpt.pt'}", "--max_iters=1", "--block_size=8")
    assert_one_line_error(proc, "another tokenizer", "python prepare.py chat --base=RUN_FOLDER --force")
    prepare.prepare("chat", input=str(path), base=str(base_run), name="on_base", data_dir=tmp_path)
    proc = run_train(*TINY, f"--data_dir={tmp_path / 'on_base'}", "--dataset=on_base",
                     f"--out_dir={tmp_path / 'l'}", f"--init_from={base_run / 'ckpt.pt'}", "--max_iters=1",
                     "--block_size=8", "--lora_rank=2")
    assert_one_line_error(proc, "LoRA", "lora_rank=0")


@pytest.mark.slow
def test_chat_fine_tuning_resumes_exactly(base_run, reverse_data, tmp_path):
    args = [*TINY, *SFT, f"--data_dir={reverse_data}", "--dataset=chat_reverse",
            f"--init_from={base_run / 'ckpt.pt'}"]
    straight, proc = assert_exact_resume(args, tmp_path, iters=6)
    assert "loss: on the assistant's tokens only" in proc.stdout and "grows" not in proc.stdout


@pytest.mark.slow
def test_chat_fine_tuning_under_ddp_matches_one_process(base_run, reverse_data, tmp_path):
    assert_ddp_matches_single_process(tmp_path, *TINY, f"--data_dir={reverse_data}", "--dataset=chat_reverse",
                                      f"--init_from={base_run / 'ckpt.pt'}")


# ----------------------------------------------------------------------------- chatting, scoring

@pytest.fixture(scope="module")
def chat_run(base_run, reverse_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = run_train(*TINY, *SFT, f"--data_dir={reverse_data}", "--dataset=chat_reverse",
                     f"--init_from={base_run / 'ckpt.pt'}", f"--out_dir={out}", "--max_iters=4")
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_history_keeps_the_newest_turns_within_the_context():
    tok = tokenizers.chat_tokenizer(prepare.char_tokenizer(sorted(set("abcdefgh?: "))))
    messages = [{"role": "system", "content": "be"}]
    for word in ("abc", "def", "gha"):
        messages += qa(f"{word}?", word[::-1])
    messages.append({"role": "user", "content": "ha?"})
    full = chat.render_prompt(messages, tok)
    assert chat.fit_history(messages, tok, len(full)) == (full, messages, 0, 0)
    prompt, kept, dropped, cut = chat.fit_history(messages, tok, len(full) - 1)  # one turn too many
    assert kept == messages[:1] + messages[3:] and dropped == 1 and cut == 0
    assert prompt == chat.render_prompt(kept, tok)
    prompt, kept, dropped, cut = chat.fit_history(messages, tok, 5)  # the last message alone is too long
    assert kept == [messages[0], messages[-1]] and dropped == 3
    assert prompt == chat.render_prompt(kept, tok)[-5:] and cut == len(chat.render_prompt(kept, tok)) - 5


class Scripted(torch.nn.Linear):
    """A stand-in model whose reply is script(prompt ids): the tokens it writes, in order."""

    def __init__(self, script, vocab_size):
        super().__init__(1, 1)
        self.script, self.config = script, type("Config", (), {"vocab_size": vocab_size})

    def generate_stream(self, idx, max_new_tokens, **sampling):
        assert sampling.get("temperature", 0.0) == 0.0  # greedy, or no sampling knobs at all
        for token in self.script(idx[0].tolist())[:max_new_tokens]:
            yield torch.tensor([token])


def test_a_reply_stops_at_the_end_marker():
    tok = tokenizers.chat_tokenizer(prepare.char_tokenizer(list("abc")))
    end, user = tok.special_ids[chat.END], tok.special_ids["<|user|>"]
    cases = [([0, 1, end, 2], 9, [0, 1]), ([0, 1, user, 2], 9, [0, 1]), ([0, 1, 2, 2], 3, [0, 1, 2])]
    for script, most, reply in cases:  # <|end|> ends it, so does another marker (a new message), or `most`
        assert list(chat.reply_tokens(Scripted(lambda ids: script, 7), tok, [user], most)) == reply


def test_questions_are_scored_by_exact_greedy_replies():
    tok = tokenizers.chat_tokenizer(prepare.char_tokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz: "))))
    questions = chat.reversal_task(0, 10, seed=3)[1]
    end = tok.special_ids[chat.END]

    def word(ids):  # the word of the prompt '<|user|>reverse: WORD<|end|><|assistant|>'
        return tok.decode(ids[1:-2]).removeprefix(chat.REVERSE)
    right = Scripted(lambda ids: tok.encode(word(ids)[::-1]) + [end], tok.vocab_size)
    echo = Scripted(lambda ids: tok.encode(word(ids)) + [end], tok.vocab_size)
    endless = Scripted(lambda ids: tok.encode(word(ids)[::-1] + "a" * 50), tok.vocab_size)
    results = chat.answer_questions(right, tok, questions)
    assert [(q, e) for q, _, e in results] == [(m[0]["content"], m[1]["content"]) for m in questions]
    assert [chat.score_answer(a, e) for _, a, e in results] == [1.0] * 10

    def score(model):
        return sum(chat.score_answer(a, e) for _, a, e in chat.answer_questions(model, tok, questions))
    assert score(echo) == sum(e == e[::-1] for *_, e in results)  # right for palindromes only
    assert score(endless) == 0  # a reply that goes on is cut a few tokens late, and wrong


def test_chat_in_the_terminal_through_stdin(chat_run):
    proc = script("sample.py", f"--out_dir={chat_run}", "--chat", "--temperature=0", "--max_new_tokens=6",
                  stdin="abc\n\ndog\nfox\n")  # a blank line is no message
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    # a 16-token context, 6 of them kept for the reply: a second message no longer fits beside the first turn
    assert "dropped the oldest 1 turn(s)" in proc.stderr and "16-token context" in proc.stderr
    # --start: one reply, the same as the first one through stdin, and stdin is never read
    one = subprocess.run([sys.executable, "sample.py", f"--out_dir={chat_run}", "--chat", "--temperature=0",
                          "--max_new_tokens=6", "--start=abc"], cwd=REPO, capture_output=True, text=True,
                         stdin=subprocess.PIPE, timeout=120, env=ENV)  # an open stdin: reading it would hang
    assert one.returncode == 0 and one.stdout.endswith("\n"), one.stderr
    assert proc.stdout.startswith(one.stdout)


def test_a_run_not_trained_for_chat_is_one_error_line(base_run):
    proc = script("sample.py", f"--out_dir={base_run}", "--chat", "--start=reverse: abc")
    assert_one_line_error(proc, "was not trained for chat", "docs/chat.md")
    proc = script("evaluate.py", "chat", f"--out_dir={base_run}")
    assert_one_line_error(proc, "was not trained for chat", "--data_dir")


def test_ctrl_c_ends_the_chat_cleanly(chat_run):
    proc = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={chat_run}", "--chat"], cwd=REPO,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    try:
        seen = ""
        while "model:" not in seen:  # the notice printed just before the chat starts reading
            seen += proc.stderr.readline()
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_evaluate_scores_the_held_out_questions(chat_run, base_run, reverse_data):
    proc = script("evaluate.py", "chat", f"--out_dir={chat_run}")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("chat: 20 questions, accuracy ") and 0 <= float(last.split()[-1]) <= 1, last
    # a base run, with the chat data: its vocabulary grown as fine-tuning starts it
    proc = script("evaluate.py", "chat", f"--init_from={base_run / 'ckpt.pt'}", f"--data_dir={reverse_data}",
                  "--limit=3")
    assert proc.returncode == 0 and "vocabulary grows" in proc.stdout, proc.stderr
    assert proc.stdout.strip().endswith("chat: 3 questions, accuracy 0.000")


def test_a_bare_flag_of_a_bool_knob_means_true():
    defaults = {"chat": False, "start": "", "max_new_tokens": 5}
    assert cli.load_config(defaults, ["--chat", "--start=hi"]) == {"chat": True, "start": "hi"}
    assert cli.load_config(defaults, ["--start=hi", "--chat"]) == {"start": "hi", "chat": True}
    for argv in (["--max_new_tokens"], ["--chat", "True"]):
        with pytest.raises(cli.ConfigError):
            cli.load_config(defaults, argv)


def test_a_chat_run_exports_with_its_template_and_llama_cpp_answers_as_sample_does(chat_run, tmp_path):
    """export.py on a chat run: llama.cpp's chat completion, through the file's own template, is
    sample.py --chat's greedy reply (the llama.cpp checks in detail: tests/test_export.py)."""
    pytest.importorskip("gguf", reason="export.py needs pip install gguf")
    llama_cpp = pytest.importorskip("llama_cpp", reason="the check needs pip install llama-cpp-python")
    path = tmp_path / "chat.gguf"
    proc = script("export.py", f"--out_dir={chat_run}", "--outtype=f32", f"--out={path}")
    assert proc.returncode == 0 and "and chat template" in proc.stdout and "--jinja" in proc.stdout, proc.stderr
    ours = script("sample.py", f"--out_dir={chat_run}", "--chat", "--temperature=0", "--max_new_tokens=6",
                  "--start=dog")  # 6 prompt tokens and 6 new ones fit the 16-token context
    assert ours.returncode == 0, ours.stderr
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=0, n_threads=1, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "dog"}], temperature=0.0,
                                       max_tokens=6)["choices"][0]["message"]["content"]
    assert reply + "\n" == ours.stdout and len(reply) > 0, (reply, ours.stdout)
