"""Students made from tiny teachers: the right layers, every head, loadable by transformers."""

import json

import pytest
import torch
from conftest import save_tiny_gpt2, save_tiny_roberta

from distillery.cli import main
from distillery.distill.student import default_student_layers, make_student, teacher_layers_of
from distillery.models import build_model, load_model
from distillery.models.common import DistilleryError


def test_default_layers():
    assert default_student_layers(12) == [0, 2, 4, 7, 9, 11]  # DistilBERT / DistilGPT2 / DistilRoBERTa
    assert default_student_layers(24) == [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]
    assert default_student_layers(6) == [0, 3, 5]
    assert default_student_layers(4) == [0, 3]
    assert default_student_layers(3) == [0, 2]
    assert default_student_layers(2) == [0]
    assert default_student_layers(1) == [0]
    for n in range(3, 49):
        layers = default_student_layers(n)
        assert len(layers) == (n + 1) // 2
        assert layers == sorted(set(layers)) and layers[0] == 0 and layers[-1] == n - 1


def hand_built(teacher, layers):
    """The student the slow way: a fresh model whose modules are assigned one by one."""
    config = teacher.config
    field = "n_layer" if teacher.family == "gpt2" else "num_hidden_layers"
    small = type(config)(**{**{f: getattr(config, f) for f in config.__dataclass_fields__}, field: len(layers)})
    model = build_model(small, teacher.task).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            for i, part in enumerate(parts):
                if part in ("blocks", "layers"):
                    parts[i + 1] = str(layers[int(parts[i + 1])])
                    break
            p.copy_(teacher.get_parameter(".".join(parts)))
    return model


@pytest.mark.parametrize("cls_name", ["GPT2", "RobertaForMaskedLM", "RobertaModel",
                                      "RobertaForSequenceClassification", "RobertaForTokenClassification",
                                      "RobertaForQuestionAnswering"])
def test_student_equals_hand_built_model(tmp_path, cls_name):
    if cls_name == "GPT2":
        teacher = load_model(save_tiny_gpt2(tmp_path / "t", n_layer=5))
    else:
        teacher = load_model(save_tiny_roberta(tmp_path / "t", cls_name, num_hidden_layers=5))
    layers = [0, 3, 4]
    student = make_student(teacher, layers).eval()
    assert student.task == teacher.task and student.config.num_layers == 3
    assert teacher_layers_of(student) == layers
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    out = student(ids, output_hidden_states=True)
    ref = hand_built(teacher, layers)(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    # The embeddings are shared with the teacher; a copied layer sees what the teacher's saw.
    teacher_out = teacher(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0], teacher_out.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states[1], teacher_out.hidden_states[1], rtol=0, atol=0)


def test_tied_weights_stay_tied_and_teacher_is_untouched(tiny_gpt2_dir, tiny_roberta_dir):
    gpt = load_model(tiny_gpt2_dir)
    student = make_student(gpt, [1])
    assert student.lm_head.weight is student.wte.weight
    assert student.wte.weight.data_ptr() != gpt.wte.weight.data_ptr()
    before = gpt.wte.weight.clone()
    with torch.no_grad():
        student.wte.weight.add_(1.0)
    torch.testing.assert_close(gpt.wte.weight, before)
    rob = make_student(load_model(tiny_roberta_dir), [0])
    assert rob.lm_decoder.weight is rob.roberta.embeddings.tok.weight


def test_transformers_loads_the_saved_student(tmp_path):
    import transformers

    teacher = load_model(save_tiny_gpt2(tmp_path / "t", n_layer=4))
    student = make_student(teacher).eval()
    student.save_pretrained(tmp_path / "s")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "s").eval()
    assert hf.config.n_layer == 2
    ids = torch.randint(0, 99, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, student(ids).logits, rtol=1e-5, atol=1e-5)
    assert teacher_layers_of(load_model(tmp_path / "s")) == [0, 3]


@pytest.mark.parametrize("layers, message", [([0, 5], "layers 0 to 3"), ([1, 1], "repeats"),
                                             ([2, 0], "increasing"), ([], "empty")])
def test_bad_layers_are_refused(tiny_gpt2_dir, tmp_path, layers, message):
    teacher = load_model(save_tiny_gpt2(tmp_path / "t", n_layer=4))
    with pytest.raises(DistilleryError, match=message):
        make_student(teacher, layers)


def test_cli_student(tmp_path, capsys):
    teacher_dir = save_tiny_roberta(tmp_path / "t", num_hidden_layers=4)
    assert main(["student", str(teacher_dir), "--out", str(tmp_path / "s"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == [0, 3]
    assert report["student_parameters"] < report["teacher_parameters"]
    assert load_model(tmp_path / "s").config.num_hidden_layers == 2
    assert main(["student", str(teacher_dir), "--layers", "0,9", "--out", str(tmp_path / "s2")]) == 2
    assert "layers 0 to 3" in capsys.readouterr().err
    assert main(["student", str(teacher_dir), "--layers", "a,b", "--out", str(tmp_path / "s3")]) == 2


def test_cli_student_copies_the_teachers_tokenizer(tmp_path, capsys):
    from distillery.tokenizer import load_tokenizer, train_tokenizer

    teacher_dir = save_tiny_gpt2(tmp_path / "t", vocab_size=300, n_layer=4)
    (tmp_path / "text.txt").write_text("a small corpus for a small tokenizer\n" * 10)
    tokenizer = train_tokenizer([tmp_path / "text.txt"], 300, "gpt2", teacher_dir, show_progress=False)
    assert main(["student", str(teacher_dir), "--layers", "1,2", "--out", str(tmp_path / "s")]) == 0
    assert "teacher layers [1, 2] of 4" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "s").fingerprint() == tokenizer.fingerprint()
    assert main(["student", str(teacher_dir), "--out", str(teacher_dir)]) == 2


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "DistilBertForMaskedLM"])
def test_cli_student_copies_a_vocab_txt_tokenizer(tmp_path, capsys, cls_name):
    import transformers
    from conftest import copy_bert_vocab, save_tiny_bert

    from distillery.tokenizer import load_tokenizer

    # vocab.txt + tokenizer_config.json + special_tokens_map.json, no tokenizer.json: old BERT checkpoints.
    depth = {"n_layers": 4} if cls_name.startswith("Distil") else {"num_hidden_layers": 4}
    teacher_dir = copy_bert_vocab(save_tiny_bert(tmp_path / "t", cls_name, vocab_size=30522, **depth))
    assert main(["student", str(teacher_dir), "--out", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer_copied"] is True
    assert load_tokenizer(tmp_path / "s").fingerprint() == load_tokenizer(teacher_dir).fingerprint()
    text = "Café owners in Zürich were unaffable."
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "s")(text)["input_ids"]
    assert theirs == transformers.AutoTokenizer.from_pretrained(teacher_dir)(text)["input_ids"]


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_cli_student_of_a_bert_family_teacher(tmp_path, capsys, family):
    import transformers

    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=37, max_position_embeddings=40)
        transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "t")
    else:
        config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=4, n_heads=4, hidden_dim=37,
                                               max_position_embeddings=40)
        transformers.DistilBertForMaskedLM(config).save_pretrained(tmp_path / "t")
    assert main(["student", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["task"], report["layers"]) == (family, "masked-lm", [0, 3])
    student = load_model(tmp_path / "s")
    assert student.config.num_layers == 2 and teacher_layers_of(student) == [0, 3]
    assert main(["student", str(tmp_path / "t"), "--layers", "0,1,2,3,3", "--out", str(tmp_path / "s2")]) == 2
    assert "--layers names 5 layers but the teacher has only 4" in capsys.readouterr().err
