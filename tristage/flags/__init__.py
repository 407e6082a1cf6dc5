"""Every command's flags: one small module per command holding its `Config` dataclass, importable without torch.

Why a package of its own: `tristage <command> --help` and a bad flag only need the Config (its fields, help texts and
checks), while the command itself needs torch, whose import alone takes about two seconds. With the Configs here the
CLI builds the parser, prints --help and checks every flag from these modules, and imports the command's module
only to run it, so --help answers in about 0.2 s and a mistyped flag is reported before torch loads.

Layout:
    base.py         what several commands share: RunConfig < TrainConfig < FinetuneConfig (every training stage),
                    LoRAArgs, PairDataArgs (reward, dpo), the Literal types of their fields (Schedule, Parallel,
                    LossType, PairLayout) and the --device / --dtype checks
    <command>.py    `Config` of `tristage <command>` (world.py: GenerateConfig and ScoreConfig of `tristage world`)

The pattern, for a new command or stage (e.g. `tristage ppo`):
1. tristage/flags/ppo.py: `@dataclass(kw_only=True) class Config(FinetuneConfig, LoRAArgs)` with the stage's own
   fields (`arg(default, help=..., check=...)`, see tristage/config.py). It imports only the standard library,
   tristage.config, tristage.io and tristage.flags.* (never torch, numpy or a module that imports them); a
   `check_flags(self)` method may add cross-field checks. A type or constant both the flags and the algorithm need
   (a Literal of loss names) is defined here and imported by the algorithm's module, not the other way round.
2. The stage module imports it at the top, `from tristage.flags.ppo import Config`, so `ppo.Config(...)` and
   `ppo.main(cfg)` work as before for tests, benchmarks and the demo.
3. tristage/cli.py's COMMANDS names both places: `"ppo": ("tristage.flags.ppo:Config", "tristage.stages.ppo:main",
   "one-line help")`. The description --help prints is the main module's docstring, read from its source file
   without importing it.
tests/test_cli.py runs `--help` of every command in a fresh interpreter and fails if torch was imported.
"""
