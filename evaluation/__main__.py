"""``python -m evaluation checkpoint=DIR bench=finance ...``: fedllm-eval configured by Hydra (conf/eval.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from fedllm_app.config import conf_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Build :class:`evaluation.runner.EvalSettings` from the composed config and evaluate."""
    from evaluation.cli import evaluate_checkpoint
    from evaluation.judge import JudgeConfig
    from evaluation.runner import EvalSettings

    raw = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = raw.pop("checkpoint")
    judge = raw.pop("judge")
    settings = EvalSettings(**raw, judge=JudgeConfig(**judge) if judge.get("base_url") else None)
    evaluate_checkpoint(checkpoint, settings)


if __name__ == "__main__":
    main()
