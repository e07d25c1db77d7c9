"""rayq.eval: judging a checkpoint — tasks, scoring, PTQ degradation, diagnostics, lm-eval bridge.

Imports the rayq core and rayq.kernels, never ray. The lm-eval adapter is imported only on use
(`rayq.eval.lm_eval_adapter`), so lm-eval stays an optional extra.
"""

from rayq.eval.degradation import (
    Interval,
    KLStats,
    degradation,
    kl_agreement,
    paired_bootstrap,
    token_batches,
    token_kl,
)
from rayq.eval.diagnostics import Diagnostics, OutlierReport, analyze, quant_dequant_rows, spectral_norm
from rayq.eval.evaluate import (
    EvalInputs,
    EvalResult,
    SchemeResult,
    check_schemes,
    default_quantizer,
    eval_inputs,
    evaluate,
    make_eval_hook,
)
from rayq.eval.scoring import (
    TaskScores,
    TextTokenizer,
    TokenScore,
    as_tokenizer,
    encode_pair,
    reduce_task,
    rolling_requests,
    score_task,
    score_tokens,
)
from rayq.eval.tasks import (
    PAPER_TASKS,
    TASKS,
    LastWord,
    MultipleChoice,
    Passage,
    Task,
    TaskSpec,
    get_spec,
    list_tasks,
    load_task,
    load_tasks,
)

__all__ = [
    "PAPER_TASKS",
    "TASKS",
    "Diagnostics",
    "EvalInputs",
    "EvalResult",
    "Interval",
    "KLStats",
    "LastWord",
    "MultipleChoice",
    "OutlierReport",
    "Passage",
    "SchemeResult",
    "Task",
    "TaskScores",
    "TaskSpec",
    "TextTokenizer",
    "TokenScore",
    "analyze",
    "as_tokenizer",
    "check_schemes",
    "default_quantizer",
    "degradation",
    "encode_pair",
    "eval_inputs",
    "evaluate",
    "get_spec",
    "kl_agreement",
    "list_tasks",
    "load_task",
    "load_tasks",
    "make_eval_hook",
    "paired_bootstrap",
    "quant_dequant_rows",
    "reduce_task",
    "rolling_requests",
    "score_task",
    "score_tokens",
    "spectral_norm",
    "token_batches",
    "token_kl",
]
