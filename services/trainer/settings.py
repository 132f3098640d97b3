from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from shared.judging.settings import JudgeBackendSettings
from shared.settings import AdminKeySettings, EngineSettings, ServiceSettings, secret_from_file


class TrainerSettings(ServiceSettings, AdminKeySettings):
    """`PREFLOOP_TRAINER_*`: keeps the preference ledger, trains DPO, gates, promotes.
    The gate's judge is configured by `PREFLOOP_JUDGE_*`, the same backend as the judge service."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_TRAINER_", env_nested_delimiter="__", extra="ignore")

    group_id: str = "prefloop-trainer"
    http_port: int = 8103
    registry_dir: str = Field("var/registry", description="model registry root")
    ledger_dir: str = Field("var/ledger", description="durable preference ledger")
    runs_dir: str = Field("var/runs", description="per-run metrics, plots, adapters")
    batch_size: int = Field(64, ge=1)
    batch_timeout_ms: int = Field(500, ge=0)
    max_text_chars: int = Field(16_000, ge=1, description="longer prompts/answers are dead-lettered")
    # trigger
    min_new_pairs: int = Field(32, ge=1, description="train when this many new pairs arrived since the last run")
    train_interval_min: float = Field(60.0, gt=0, description="or every T minutes if any new pair arrived")
    check_interval_s: float = Field(2.0, gt=0)
    failure_backoff_s: float = Field(60.0, ge=0, description="after a failed run, wait this long before the next "
                                     "automatic one; doubled per further consecutive failure")
    failure_backoff_max_s: float = Field(3600.0, ge=0, description="the longest back-off wait")
    max_consecutive_failures: int = Field(5, ge=1, description="stop triggering after this many failed runs in a "
                                          "row, until POST /train")
    announce_retry_s: float = Field(1.0, gt=0, description="how often queued model-update announcements are sent")
    # data selection
    replay_fraction: float = Field(0.5, ge=0, description="older ledger pairs mixed in, as a fraction of new pairs")
    stale_versions: int = Field(0, ge=0, description="drop pairs from policies more than K versions old (0 = keep)")
    max_pairs_per_run: int = Field(2048, ge=1)
    # DPO (seed 001 defaults; a base model's recipe fills the unset ones: services/trainer/recipes.py)
    beta: float = 0.1
    sft_weight: float = Field(0.0, ge=0, description="RPO: weight of the chosen answers' NLL added to the DPO loss")
    reference: Literal["parent", "root"] = Field(
        "root", description="DPO reference model: the lineage's root (the bootstrapped base; every round regularized "
                            "toward it, replayed pairs keep the margins they won and never pay a reference pass again), "
                            "or each run's parent (TRL's default with peft: round after round the anchor moves)")
    learning_rate: float | None = None
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 2
    max_length: int = 1024
    lora_r: int = 16
    lora_alpha: int = 32
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    quantization: Literal["none", "nf4"] = "none"
    precompute_ref_log_probs: bool = False
    activation_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass: far less memory for one more "
                           "forward pass per step (off: a 135M-1B model's activations fit; on for long sequences "
                           "or big models)")
    dpo_implementation: Literal["auto", "prefloop", "trl"] = Field(
        "auto", description="prefloop's loop (services/trainer/lean_dpo.py, CPU or CUDA) or TRL's DPOTrainer; auto: "
                            "prefloop, TRL for QLoRA (nf4)")
    max_drift: float = Field(
        0.0, ge=0, description="DPO (prefloop's loop and TRL's) stops when the perplexity of the drift monitor (40 medical "
                               "reference answers apart from the gate's guard set) rose more than this (from the "
                               "lower of the parent's and the reference's) and keeps the adapter of the last check "
                               "within it; no check within it: the run is rejected unmerged; 0: off")
    drift_check_steps: int = Field(4, ge=1, description="optimizer steps between drift checks")
    first_round_max_drift: float | None = Field(
        None, ge=0, description="the drift budget of a run whose parent DPO has not trained (the first round; "
                                "none: max_drift): below max_drift, it leaves the later rounds, counted from the "
                                "same base, room")
    drift_patience: int = Field(0, ge=0, description="checks past the drift budget training goes on through, in "
                                "case the monitor comes back within it (the last check within it is kept either "
                                "way); 0: stop at the first")
    schedule_tail: float = Field(0.0, ge=0, lt=1, description="DPO (prefloop's loop and TRL's) leaves the "
                                 "schedule's last steps unrun once the learning rate they would still give is at "
                                 "most this share of the schedule's (0.05 of 28 steps: 20 run); 0: every step")
    seed: int = Field(42, description="DPO's seed (initialisation, dropout, batch order) and the replay sample's")
    # gate
    min_win_ci_lower: float = Field(0.5, ge=-1, le=1, description="promote only when the lower bound of the 95% CI "
                                    "of the win rate vs the parent is above this (-1: any win rate; 1: never)")
    eval_prompts: int = Field(64, ge=1, description="held-out prompts both models answer (at most 110 ship)")
    eval_samples: int = Field(2, ge=1, le=16, description="answers per held-out prompt and version, compared "
                              "pairwise; the CI counts a prompt's comparisons as one cluster (answer sampling "
                              "is most of one comparison's noise: README, 'The gate's answers per question')")
    medical_reference_size: int = Field(110, ge=0, le=110, description="held-out medical Q/A pairs of the forgetting "
                                        "guard (the other 40 that ship are DPO's drift monitor)")
    general_reference_size: int = Field(100, ge=0, description="general Q/A pairs of the second forgetting guard")
    eval_max_new_tokens: int = Field(128, ge=1)
    eval_seed: int = Field(0, ge=0, description="mixed into the seed of every held-out answer (with the weights, "
                           "the prompt and the sample): another value draws other answers; 0 keeps earlier "
                           "gates' draws (prefloop demo --seed)")
    preference_accuracy_tolerance: float = Field(
        0.05, ge=0, description="held-out preference accuracy dropping more than this is flagged (not gating)")
    safety_tolerance: float = Field(0.0, ge=0, description="allowed drop of the mean safety score (0 = none)")
    max_perplexity_increase: float = Field(0.05, ge=0, description="forgetting guard on the SFT reference set")
    max_length_drift: float = Field(0.20, ge=0, description="mean answer length change allowed")
    heldout_pairs: int = Field(64, ge=0, description="held-out ledger pairs for preference accuracy")
    reward_hack_window: int = Field(5, ge=1, description="flag runs at reward accuracy 1.0 over the first N logs")
    judge: JudgeBackendSettings = Field(default_factory=JudgeBackendSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    # operator console (/console)
    viewer_key: str = Field("", repr=False, description="bearer key for the console's read-only views (the admin "
                            "key may also label)")
    viewer_key_file: str = Field("", description="file holding the viewer key (a mounted secret)")

    @model_validator(mode="after")
    def _viewer_key_from_file(self):
        self.viewer_key = secret_from_file(self.viewer_key, self.viewer_key_file, "PREFLOOP_TRAINER_VIEWER_KEY")
        if self.viewer_key and self.viewer_key == self.admin_key:
            raise ValueError("PREFLOOP_TRAINER_VIEWER_KEY must differ from the admin key")
        return self

