"""Print the local folder of a configured model, to start a server on it:

    python -m tsalign.engines.scoring.served teacher [overrides]    # e.g. the fitted CPU teacher (fitted first if needed)
    python -m tsalign.engines.scoring.served policy                 # e.g. SmolLM2 (converted from its GGUF once)
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import hydra
    from omegaconf import OmegaConf

    from tsalign.cli import CONF_DIR, configure
    from tsalign.config.schema import register_configs
    from tsalign.stages.factory import teacher_model_dir
    from tsalign.stages.lineage import base_model_dir

    if not argv or argv[0] not in ("teacher", "policy", "student"):
        sys.exit(__doc__)
    register_configs()
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("config", argv[1:])
    OmegaConf.set_readonly(cfg, False)
    configure(cfg)
    role = argv[0]
    folder = teacher_model_dir(cfg) if role == "teacher" else base_model_dir(cfg, cfg[role])
    if folder is None:
        sys.exit(f"{role} is served over HTTP ({cfg.teacher.served.base_url}): it has no local folder")
    print(folder)


if __name__ == "__main__":
    main(sys.argv[1:])
