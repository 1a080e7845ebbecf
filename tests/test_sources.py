"""Dataset sources and formats, text-field detection, and the config file."""

import json

import pytest

from greentext_dist.config import parse_args
from greentext_dist.sources import first_example, open_dataset, text_getter
from greentext_dist.errors import UserError

POSTS = [">be me\n>write tests", ">be you\n\n>read them", ">mfw café 🙂"]


def posts_of(path, field=None):
    ds = open_dataset(str(path))
    get = text_getter(first_example(ds, str(path)), field, str(path))
    return [get(ex).strip() for ex in ds]


def test_formats(tmp_path):
    import pandas as pd

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in POSTS))
    (tmp_path / "a.txt").write_text("\n\n".join(POSTS).replace(">be you\n\n>read them", ">be you\n>read them"))
    pd.DataFrame({"text": POSTS}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"text": POSTS}).to_parquet(tmp_path / "a.parquet")
    assert posts_of(tmp_path / "a.jsonl") == POSTS
    assert posts_of(tmp_path / "a.csv") == POSTS
    assert posts_of(tmp_path / "a.parquet") == POSTS
    assert posts_of(tmp_path / "a.txt") == [POSTS[0], ">be you\n>read them", POSTS[2]]  # a post per paragraph
    (tmp_path / "list.json").write_text(json.dumps([{"text": p} for p in POSTS]))  # one JSON array
    assert posts_of(tmp_path / "list.json") == POSTS
    # One object with the records under a key (SQuAD's layout), which `datasets` reads only when told the key.
    (tmp_path / "nested.json").write_text(json.dumps({"version": 2, "data": [{"text": p} for p in POSTS]}, indent=1))
    assert posts_of(tmp_path / "nested.json") == POSTS
    (tmp_path / "lines.json").write_text("".join(json.dumps({"text": p}) + "\n" for p in POSTS))  # JSON lines named .json
    assert posts_of(tmp_path / "lines.json") == POSTS


def test_line_endings_are_one_whatever_the_file(tmp_path):
    """Posts written with Windows ("\\r\\n") or old Mac ("\\r") line endings are the same posts, so the same tokens:
    a .txt file already reaches us with "\\n" (Python's universal newlines), and every other format now does too."""
    import pandas as pd

    from greentext_dist.data import cache_dir, prepare_source
    from greentext_dist.sources import source_posts
    from greentext_dist.generate import as_greentext
    from greentext_dist.tokenizer import bundled_gpt2

    posts = [p.replace(">be you\n\n>read them", ">be you\n>read them") for p in POSTS] + [">be windows\n>end lines twice\n"]
    crlf = [p.replace("\n", "\r\n") for p in posts]
    (tmp_path / "lf.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in posts))
    (tmp_path / "crlf.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in crlf))
    (tmp_path / "cr.jsonl").write_text("".join(json.dumps({"text": p.replace("\n", "\r")}) + "\n" for p in posts))
    (tmp_path / "crlf.txt").write_bytes("\r\n\r\n".join(crlf).encode())
    pd.DataFrame({"text": crlf}).to_csv(tmp_path / "crlf.csv", index=False, lineterminator="\r\n")
    pd.DataFrame({"text": crlf}).to_parquet(tmp_path / "crlf.parquet")
    expected = [p.strip() for p in posts]
    for name in ("lf.jsonl", "crlf.jsonl", "cr.jsonl", "crlf.txt", "crlf.csv", "crlf.parquet"):
        assert list(source_posts(str(tmp_path / name), None)) == expected, name
    tok, cache = bundled_gpt2(), cache_dir(str(tmp_path / "cache"))
    stores = [prepare_source(str(tmp_path / name), None, tok, cache, progress=False) for name in ("lf.jsonl", "crlf.jsonl", "crlf.txt")]
    assert len({s.path for s in stores}) == 3 and len({s.tokens.tobytes() for s in stores}) == 1
    assert 201 not in stores[1].tokens  # GPT-2's "\r": never learned, never generated
    assert as_greentext("be me\r\ngo outside\rmfw") == ">be me\n>go outside\n>mfw"


def test_compressed_files(tmp_path):
    """posts.jsonl.gz (or .bz2, .xz; any text format) streams as the plain file does, alone or in a folder; its
    bad lines are named as in a plain file; a compressed parquet file (which cannot stream) is refused."""
    import bz2
    import gzip
    import lzma

    import pandas as pd

    from greentext_dist.sources import source_posts

    jsonl = "".join(json.dumps({"text": p}) + "\n" for p in POSTS).encode()
    txt = "\n\n".join(p.replace(">be you\n\n>read them", ">be you\n>read them") for p in POSTS).encode()
    paragraphs = [POSTS[0], ">be you\n>read them", POSTS[2]]
    files = {"a.jsonl.gz": (gzip, jsonl), "a.jsonl.bz2": (bz2, jsonl), "a.jsonl.xz": (lzma, jsonl), "b.txt.gz": (gzip, txt),
             "c.csv.gz": (gzip, pd.DataFrame({"text": POSTS}).to_csv(index=False).encode()),
             "d.json.xz": (lzma, json.dumps({"version": 2, "data": [{"text": p} for p in POSTS]}).encode())}  # minified, one line
    for name, (codec, data) in files.items():
        (tmp_path / name).write_bytes(codec.compress(data))
        assert list(source_posts(str(tmp_path / name), None)) == (paragraphs if ".txt" in name else POSTS), name
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"part{i}.jsonl.gz").write_bytes(gzip.compress(jsonl))
    assert list(source_posts(str(shards), None)) == POSTS * 2
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl + b'{"text": "cut off\n'))
    with pytest.raises(UserError, match=r"cut.jsonl.gz line 4 is not valid JSON \(Unterminated string"):
        list(source_posts(str(tmp_path / "cut.jsonl.gz"), None))
    (tmp_path / "w.txt.gz").write_bytes(gzip.compress(txt.decode().encode("cp1252", errors="replace")))
    with pytest.raises(UserError, match=r"w.txt.gz line 7 is not UTF-8 text \(bytes e9\).*zcat .*w.txt.gz \| iconv -f cp1252 -t utf-8 > .*w-utf8.txt"):
        list(source_posts(str(tmp_path / "w.txt.gz"), None))
    pd.DataFrame({"text": POSTS}).to_parquet(tmp_path / "p.parquet")
    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress((tmp_path / "p.parquet").read_bytes()))
    with pytest.raises(UserError, match="p.parquet.gz is a compressed parquet file.*decompress it"):
        list(source_posts(str(tmp_path / "p.parquet.gz"), None))


def test_datasets_saved_to_disk_and_arrow_files(tmp_path):
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict's train split) reads as its posts in
    order, as do its .arrow files alone; saving other posts there makes a new store; a DatasetDict without a train
    split and a damaged folder are one line each."""
    import shutil

    from datasets import Dataset, DatasetDict

    from greentext_dist.data import cache_dir, prepare_source
    from greentext_dist.sources import source_posts
    from greentext_dist.sources import estimate_posts
    from greentext_dist.tokenizer import bundled_gpt2

    posts = [f">be me {i}\n>save to disk" for i in range(30)]
    saved = tmp_path / "saved"
    Dataset.from_dict({"id": list(range(30)), "text": posts}).save_to_disk(saved, num_shards=3)  # row order across shards
    DatasetDict({"train": Dataset.from_dict({"text": posts}), "test": Dataset.from_dict({"text": [">held out"]})}).save_to_disk(tmp_path / "dict")
    for name in ("saved", "dict"):
        assert list(source_posts(str(tmp_path / name), None)) == posts, name
        assert estimate_posts(str(tmp_path / name)) == 30
    arrows = tmp_path / "arrows"
    arrows.mkdir()
    for f in saved.glob("*.arrow"):
        shutil.copy(f, arrows)
    assert list(source_posts(str(arrows), None)) == posts
    assert list(source_posts(str(arrows / "data-00001-of-00003.arrow"), None)) == posts[10:20]

    tok, cache = bundled_gpt2(), cache_dir(str(tmp_path / "cache"))
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in posts))
    first, plain = (prepare_source(str(tmp_path / n), None, tok, cache, progress=False) for n in ("saved", "posts.jsonl"))
    assert first.tokens.tobytes() == plain.tokens.tobytes()
    Dataset.from_dict({"text": posts[::-1]}).save_to_disk(tmp_path / "resaved")
    shutil.rmtree(saved)
    (tmp_path / "resaved").rename(saved)
    again = prepare_source(str(saved), None, tok, cache, progress=False)
    assert again.path != first.path and again.tokens.tobytes() != first.tokens.tobytes()

    DatasetDict({"validation": Dataset.from_dict({"text": posts})}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(UserError, match=r"no-train is a saved DatasetDict without a 'train' split \(splits: validation\).*no-train/validation"):
        list(source_posts(str(tmp_path / "no-train"), None))
    next(saved.glob("*.arrow")).unlink()
    with pytest.raises(UserError, match=r"saved lists data-00000-of-00001.arrow, which is not there"):
        list(source_posts(str(saved), None))


def test_byte_order_marks_and_other_encodings(tmp_path):
    """A byte-order mark (Windows editors write one) is not part of the first post; a file in another encoding than
    UTF-8 is one line naming the file, the line and the bytes, not a decoder traceback."""
    import pandas as pd

    from greentext_dist.sources import source_posts

    posts = [">be me\n>café", ">be you\n>tfw"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(posts).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": p}) + "\n" for p in posts).encode())
    pd.DataFrame({"text": posts}).to_csv(tmp_path / "bom.csv", index=False, encoding="utf-8-sig")
    for name in ("bom.txt", "bom.jsonl", "bom.csv"):
        assert list(source_posts(str(tmp_path / name), None)) == posts, name
    (tmp_path / "cp1252.txt").write_bytes("\n\n".join(posts).encode("cp1252"))
    (tmp_path / "cp1252.jsonl").write_bytes("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in posts).encode("cp1252"))
    pd.DataFrame({"text": posts}).to_csv(tmp_path / "cp1252.csv", index=False, encoding="cp1252")
    for name, line in (("cp1252.txt", 2), ("cp1252.jsonl", 1), ("cp1252.csv", 3)):
        with pytest.raises(UserError, match=rf"cp1252\.\w+ line {line} is not UTF-8 text \(bytes e9\).*iconv -f cp1252 -t utf-8"):
            list(source_posts(str(tmp_path / name), None))


def test_directory_and_prompt_completion(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i, p in enumerate(POSTS):
        (d / f"part{i}.jsonl").write_text(json.dumps({"prompt": p[:4], "completion": p[4:]}) + "\n")
    assert sorted(posts_of(d)) == sorted(POSTS)
    for hidden in (".ipynb_checkpoints/part0-checkpoint.jsonl", ".cache/huggingface/x.jsonl", "__MACOSX/._part0.jsonl"):
        (d / hidden).parent.mkdir(parents=True, exist_ok=True)
        (d / hidden).write_text(json.dumps({"prompt": "a stale", "completion": " copy"}) + "\n")
    assert sorted(posts_of(d)) == sorted(POSTS)  # hidden files and folders are not data, as for `datasets`
    (d / "extra.csv").write_text("text\nx\n")
    with pytest.raises(UserError, match=r"mixes file types \(csv: extra.csv; json: part0.jsonl, part1.jsonl, part2.jsonl\).*--dataset .*extra.csv"):
        open_dataset(str(d))


def test_a_downloaded_hub_repo_and_shards_that_disagree(tmp_path):
    """`hf download --repo-type dataset` of an older repo holds dataset_infos.json beside the data: metadata, not
    posts (was a CastError traceback). A repo with train and test files trains on train's. Shards whose columns differ
    are one line naming the odd file."""
    from greentext_dist.sources import source_posts

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in POSTS))
    (repo / "dataset_infos.json").write_text(json.dumps({"default": {"features": {"text": {"dtype": "string"}}, "splits": {"train": {}}}}))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    assert list(source_posts(str(repo), None)) == [p.strip() for p in POSTS]
    # The hub's layout of splits by file name: the test split's posts never become training posts (as load_dataset(DIR)).
    import pandas as pd

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    train = [f">be me {i}\n>train" for i in range(6)]
    for i in range(2):
        pd.DataFrame({"text": train[3 * i:3 * i + 3]}).to_parquet(hub / "data" / f"train-0000{i}-of-00002.parquet")
    pd.DataFrame({"text": [">be me\n>held out"]}).to_parquet(hub / "data" / "test-00000-of-00001.parquet")
    assert list(source_posts(str(hub), None)) == train
    assert list(source_posts(str(hub / "data" / "test-00000-of-00001.parquet"), None)) == [">be me\n>held out"]

    (repo / "data" / "zz-extra.jsonl").write_text(json.dumps({"text": ">be me", "score": 3}) + "\n")
    with pytest.raises(UserError, match=r"zz-extra.jsonl has columns \['score', 'text'\] where the first file of .*repo has \['text'\]"):
        list(source_posts(str(repo), None))


def test_explicit_text_field(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(POSTS)))
    assert posts_of(p, "body") == POSTS
    with pytest.raises(UserError, match="no field 'text'.*fields: body, id"):
        posts_of(p, "text")


def test_config_file_then_cli(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[optim]\nlr = 1e-3\nwarmup_steps = 7\n[train]\nmicro_batch_size = 4\n[model]\nmodel = 'medium'\n")
    cfg = parse_args(["--config", str(f), "--lr", "2e-3"])
    assert cfg.optim.lr == 2e-3 and cfg.optim.warmup_steps == 7  # CLI beats file, file beats default
    assert cfg.train.micro_batch_size == 4 and cfg.model.model == "medium"
    assert cfg.optim.weight_decay == 0.01 and cfg.optim.beta2 == 0.999 and cfg.data.seq_len == 1024
    f.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(UserError, match="unknown setting 'optim.learning_rate'"):
        parse_args(["--config", str(f)])


def test_home_in_paths_is_expanded(tmp_path, monkeypatch, corpus):
    """A config file (or a quoted flag) passes '~' through; it means the home folder, never a folder named '~'."""
    from conftest import run_inprocess, tiny_args

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "posts.jsonl").write_text(corpus.read_text())
    f = tmp_path / "run.toml"
    f.write_text('[data]\ndataset = "~/posts.jsonl"\nmix = ["~/posts.jsonl=0.2"]\n[checkpoint]\noutput_dir = "~/runs/a"\n')
    cfg = parse_args(["--config", str(f), "--model-path", "~/m"])
    assert cfg.data.dataset == str(tmp_path / "posts.jsonl") and cfg.data.mix == [f"{tmp_path}/posts.jsonl=0.2"]
    assert cfg.checkpoint.output_dir == str(tmp_path / "runs" / "a") and cfg.model.model_path == str(tmp_path / "m")
    args = tiny_args("~/posts.jsonl", "~/runs/b", "--max-steps", "1", "--global-batch-size", "4", "--micro-batch-size", "2")
    assert run_inprocess(args) == 0
    assert (tmp_path / "runs" / "b" / "final" / "config.json").is_file() and not (tmp_path / "~").exists()
