"""What the trainer tests share: a tiny tokenized corpus and tiny teachers that fit it."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from conftest import save_tiny_gpt2, save_tiny_roberta

from distillery.distill.data import prepare_corpus
from distillery.tokenizer import load_tokenizer, train_tokenizer

# Small, stable modules of the standard library: a few hundred kB of real code.
MODULES = ("bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "keyword.py", "shlex.py",
           "string.py", "textwrap.py", "this.py")


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in MODULES if (root / name).is_file()]


def make_data(folder: Path, style: str = "gpt2", vocab_size: int = 300) -> Path:
    """folder/tokenizer (a trained BPE) and folder/data (the modules, one held out)."""
    files = corpus_files()
    tokenizer = train_tokenizer(files, vocab_size, style, folder / "tokenizer", show_progress=False)
    prepare_corpus(files, tokenizer, folder / "data", val_docs=1, progress=False)
    return folder / "data"


def make_gpt2(directory: Path, tokenizer_dir: Path, dropout: float = 0.1, **overrides) -> Path:
    """A tiny random GPT-2 for the tokenizer in `tokenizer_dir`, saved with it."""
    tokenizer = load_tokenizer(tokenizer_dir)
    settings = dict(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.eos_token_id,
                    eos_token_id=tokenizer.eos_token_id, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    save_tiny_gpt2(directory, **{**settings, **overrides})
    tokenizer.save_pretrained(directory)
    return directory


def make_roberta(directory: Path, tokenizer_dir: Path, dropout: float = 0.1, **overrides) -> Path:
    """A tiny random RoBERTa masked LM for the (RoBERTa-style) tokenizer in `tokenizer_dir`."""
    tokenizer = load_tokenizer(tokenizer_dir)
    save_tiny_roberta(directory, "RobertaForMaskedLM", vocab_size=tokenizer.vocab_size,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout, **overrides)
    tokenizer.save_pretrained(directory)
    return directory


def make_student(teacher_dir: Path, directory: Path) -> Path:
    """The half-depth student of a saved teacher, saved with the teacher's tokenizer."""
    from distillery.distill.student import make_student as student_of
    from distillery.distill.trainer import load_lm

    student_of(load_lm(str(teacher_dir))).save_pretrained(directory)
    load_tokenizer(teacher_dir).save_pretrained(directory)
    return directory


def make_teacher_student(root: Path) -> dict[str, Path]:
    """Data, a 2-layer GPT-2 teacher without dropout and its student, under `root`: the pair the
    distillation tests share."""
    data = make_data(root)
    teacher = make_gpt2(root / "teacher", root / "tokenizer", dropout=0.0, n_layer=2)
    return {"root": root, "data": data, "teacher": teacher, "student": make_student(teacher, root / "student")}
