import json

import pytest
from eval_helpers import FIXTURES, toy_text

from rayq.errors import UserError
from rayq.eval import PAPER_TASKS, TASKS, LastWord, MultipleChoice, Passage, get_spec, load_task, load_tasks

PATHS = {
    "piqa": FIXTURES / "piqa" / "valid.jsonl",
    "hellaswag": FIXTURES / "hellaswag" / "hellaswag_val.jsonl",
    "winogrande": FIXTURES / "winogrande" / "dev.jsonl",
    "lambada": FIXTURES / "lambada" / "lambada_test.jsonl",
    "copa": FIXTURES / "copa" / "copa-test.xml",
    "copa100": FIXTURES / "copa" / "val.jsonl",
    "storycloze": FIXTURES / "storycloze" / "cloze_test_val__spring2016.csv",
    "paralex": FIXTURES / "paralex" / "word_alignments.txt",
}


def test_registry_has_the_papers_eight_and_builtins():
    assert set(PAPER_TASKS) <= set(TASKS)
    assert {"heldout-lambada", "heldout-cloze", "heldout-ppl"} <= set(TASKS)
    assert get_spec("PIQA").name == "piqa"  # paper spelling works


def test_unknown_task_suggests_closest():
    with pytest.raises(UserError, match=r"unknown task 'hellaswg'; did you mean 'hellaswag'\?"):
        get_spec("hellaswg")
    with pytest.raises(UserError, match="did you mean 'heldout-cloze'"):
        load_tasks(["heldout-clozee"], {})
    with pytest.raises(UserError, match="did you mean 'winogrande'"):
        load_tasks(["piqa"], {"winogrand": "x"})


def test_all_eight_loaders_on_released_format_fixtures():
    tasks = {t.name: t for t in load_tasks(list(PAPER_TASKS), {k: str(v) for k, v in PATHS.items()})}
    assert {k: len(t) for k, t in tasks.items()} == {
        "piqa": 3, "hellaswag": 2, "winogrande": 3, "lambada": 4, "copa": 3, "copa100": 2, "storycloze": 2,
        "paralex": 5}
    copa = tasks["copa"].items
    assert copa[0] == MultipleChoice(("The cat sat on the mat therefore",) * 2,
                                     (" the mat was warm.", " the zebra quizzed jugs."), 0)
    assert copa[1].contexts[0] == "The man ran to the park because" and [i.label for i in copa] == [0, 1, 0]
    assert tasks["copa100"].items[1].label == 1 and tasks["copa100"].items[0].contexts[0] == "The sun went down because"
    hs = tasks["hellaswag"].items
    assert hs[0].contexts[0] == "Walking the dog: A man walks the dog to the park. Then"
    # [tags] cleaned as lm-eval does (ctx_b.capitalize() leaves "[step] put" lower-case, as there)
    assert hs[1].contexts[0] == "Home and Garden: How to bake a cake. Mix the flour. put the cake"
    assert hs[1].continuations[1] == "  quiz fjord vex qxz." and hs[1].label == 3
    piqa = tasks["piqa"].items
    assert piqa[0].contexts[0] == "Question: How do you keep the cat warm?\nAnswer:"
    assert [i.label for i in piqa] == [0, 1, 1]
    sc = tasks["storycloze"].items
    assert sc[1].contexts[0] == "The boy baked a cake. He put it in the oven, then waited. The cake was warm. He ate the cake."
    assert sc[1].label == 1 and sc[0].continuations == (" The dog sat on the mat.", " Jazz quiz fjord.")
    wg = tasks["winogrande"].items[0]
    assert wg.contexts == ("The cat sat on the mat because the mat", "The cat sat on the mat because the quiz")
    assert wg.continuations == (" was warm.", " was warm.") and wg.label == 0
    assert tasks["lambada"].items[0] == LastWord("the cat sat on the mat and the dog sat on the", " mat")
    px = tasks["paralex"].items
    assert all(len(i.continuations) == 4 for i in px)
    assert px[0].contexts[0] == "Question: how do you keep a cat warm ?\nParaphrase:"
    assert px[0].continuations[px[0].label] == " what keeps the cat warm ?"
    assert tasks["paralex"].primary == "acc_bytes" and tasks["hellaswag"].primary == "acc_norm"


def test_piqa_accepts_directory_and_needs_labels(tmp_path):
    assert len(load_task("piqa", path=str(FIXTURES / "piqa"))) == 3
    (tmp_path / "valid.jsonl").write_text((FIXTURES / "piqa" / "valid.jsonl").read_text())
    with pytest.raises(UserError, match="labels file not found: .*valid-labels.lst"):
        load_task("piqa", path=str(tmp_path / "valid.jsonl"))
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(UserError, match=r"valid.jsonl:3: no label"):
        load_task("piqa", path=str(tmp_path / "valid.jsonl"))


def test_missing_task_file_and_missing_path():
    with pytest.raises(UserError, match=r"task hellaswag: file not found: /nonexistent/h.jsonl"):
        load_task("hellaswag", path="/nonexistent/h.jsonl")
    with pytest.raises(UserError, match=r"set eval.task_paths.storycloze=PATH"):
        load_tasks(["storycloze"], {})


@pytest.mark.parametrize("name,filename,content,message", [
    ("hellaswag", "h.jsonl", json.dumps({"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["a"], "label": 0})
     + "\n{not json\n", r"h.jsonl:2: malformed JSON line"),
    ("winogrande", "dev.jsonl", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
     r"dev.jsonl:1: sentence has no blank"),
    ("winogrande", "test.jsonl", '\n{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""}\n',
     r"test.jsonl:2: answer should be"),
    ("lambada", "l.jsonl", '{"text": "one two"}\n{"txt": "x y"}\n', r"l.jsonl:2: missing field 'text'"),
    ("copa100", "val.jsonl", '{"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}\n',
     r"val.jsonl:1: question/asks-for should be"),
    ("copa", "copa-test.xml", "<copa-corpus>\n<item id='1'>\n</copa-corpus>\n", r"copa-test.xml:3: malformed XML"),
    ("hellaswag", "h2.jsonl", json.dumps({"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["a", "b"],
                                          "label": 5}) + "\n", r"h2.jsonl:1: label 5 out of range"),
    ("storycloze", "s.csv", "InputStoryid,InputSentence1\nx,y\n", r"s.csv:1: csv header lacks"),
    ("storycloze", "s2.csv", (FIXTURES / "storycloze" / "cloze_test_val__spring2016.csv").read_text().splitlines()[0]
     + "\nid,a,b,c,d,e,f,3\n", r"s2.csv:2: label 3 out of range"),
    ("paralex", "p.txt", "q1\tp1\nonly one field\n", r"p.txt:2: expected question<TAB>paraphrase"),
])
def test_malformed_input_names_file_and_line(tmp_path, name, filename, content, message):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_task(name, path=str(path))


def test_builtin_tasks_deterministic_and_sized():
    texts = {"toy/a": toy_text(60, seed=5), "toy/b": toy_text(60, seed=6)}
    for name in ("heldout-lambada", "heldout-cloze"):
        a = load_task(name, heldout_texts=texts, size=40, seed=0)
        b = load_task(name, heldout_texts=dict(reversed(list(texts.items()))), size=40, seed=0)
        c = load_task(name, heldout_texts=texts, size=40, seed=1)
        assert len(a) == 40 and a.items == b.items and a.items != c.items
        assert a.source == "heldout:toy/a,toy/b"
    lam = load_task("heldout-lambada", heldout_texts=texts, size=40).items
    for item in lam:  # the target already occurs in the passage, LAMBADA's hallmark
        assert item.target.startswith(" ") and item.target.strip().isalpha()
        assert item.target.strip() in item.context.replace(".", " ").replace(",", " ").split()
    cloze = load_task("heldout-cloze", heldout_texts=texts, size=40).items
    for item in cloze:
        assert len(item.continuations) == 4 and len(set(item.continuations)) == 4
        assert item.contexts[0].count(".") >= 3
    labels = [i.label for i in cloze]
    assert len(set(labels)) > 1  # the true sentence is not always in the same slot
    ppl = load_task("heldout-ppl", heldout_texts=texts, size=3).items
    assert 1 <= len(ppl) <= 3 and all(isinstance(p, Passage) for p in ppl)


def test_builtin_tasks_need_heldout_text():
    with pytest.raises(UserError, match="built from held-out documents"):
        load_task("heldout-lambada")
    with pytest.raises(UserError, match="too short"):
        load_task("heldout-lambada", heldout_texts={"x": "a b c"})
    with pytest.raises(UserError, match="too few sentences"):
        load_task("heldout-cloze", heldout_texts={"x": "One two three. Four five six."})


def test_rayq_eval_never_imports_ray_and_ls_lists_tasks(capsys):
    import subprocess
    import sys

    code = "import sys, rayq.eval, rayq.eval.commands, rayq.eval.bench; assert 'ray' not in sys.modules; " \
           "assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    from rayq.commands import ls

    assert ls(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "heldout-cloze" in out and "paralex" in out


def test_split_modules_keep_the_public_names_of_rayq_eval_tasks():
    import rayq.eval.tasks as tasks
    from rayq.eval import heldout_tasks, task_formats, task_items

    for name in tasks.__all__:
        assert hasattr(tasks, name), name
    assert tasks.MultipleChoice is task_items.MultipleChoice and tasks.load_piqa is task_formats.load_piqa
    assert tasks.build_heldout_cloze is heldout_tasks.build_heldout_cloze
    assert {s.loader for s in tasks.TASKS.values() if s.loader} <= {getattr(task_formats, n) for n in task_formats.__all__}
