"""mmekit's harness tools (`python -m scripts.<tool>`), the code behind the Make targets."""

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HANDLERS_DIR = PROJECT_ROOT / "handlers"

# The handler modules are flat (TorchServe imports them from the archive root), so the tools
# import them the same way: `import mmekit_models`, never `handlers.mmekit_models`.
if str(HANDLERS_DIR) not in sys.path:
    sys.path.insert(0, str(HANDLERS_DIR))
