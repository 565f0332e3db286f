"""`fastsam3d serve`: a local HTTP server with a browser page over the Predictor (API: `serve.server.run_server`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from fastsam3d_cli.cli.common import cli_errors, state

EPILOG = (
    "Examples:\n\n"
    "  fastsam3d serve ct.nii.gz                              (then open http://127.0.0.1:8000/)\n\n"
    "  fastsam3d serve --root ~/scans --checkpoint student.pth --port 8080\n\n"
    "  fastsam3d serve --host 0.0.0.0 --token \"$(python -c 'import secrets; print(secrets.token_urlsafe())')\"\n\n"
    "Exit codes: 0 stopped with Ctrl-C, 2 usage (a non-loopback --host without --token), 3 bad input (port in "
    "use, missing --root or volume), 4 weights, 5 device."
)
ADVANCED = "Model and device"
LIMITS = "Limits and security"


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the app."""

    @app.command("serve", epilog=EPILOG)
    @cli_errors
    def serve(
        volumes: Optional[List[Path]] = typer.Argument(None, metavar="VOLUME",
                                                       help="Volumes to open as sessions at start."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs "
                                                             "--token.", rich_help_panel=LIMITS),
        port: int = typer.Option(8000, "--port", help="Port (0 picks a free one)."),
        root: Optional[Path] = typer.Option(None, "--root", metavar="DIR",
                                            help="Folder whose volumes clients may open by path (nothing outside "
                                                 "it is read). Without it only uploads and VOLUMEs.",
                                            rich_help_panel=LIMITS),
        token: Optional[str] = typer.Option(None, "--token", envvar="FASTSAM3D_TOKEN",
                                            help="Bearer token every API request must carry (required for a "
                                                 "non-loopback --host).", rich_help_panel=LIMITS),
        model: Optional[str] = typer.Option(None, "--model", "-m",
                                            help="fastsam3d (default), sam-med3d or fastsam3d-tiny.",
                                            rich_help_panel=ADVANCED),
        checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="PATH",
                                                  help="Checkpoint file; its model is inferred unless --model is "
                                                       "given.", rich_help_panel=ADVANCED),
        device: str = typer.Option("auto", "--device", envvar="FASTSAM3D_DEVICE", help="auto, cpu, cuda or cuda:N.",
                                   rich_help_panel=ADVANCED),
        attention: str = typer.Option("auto", "--attention", help="Encoder attention: auto, exact, sdpa, flash or "
                                                                   "sparse.", rich_help_panel=ADVANCED),
        dtype: str = typer.Option("float32", "--dtype", help="float32 (exact), bfloat16 or float16.",
                                  rich_help_panel=ADVANCED),
        max_crops: int = typer.Option(8, "--max-crops", min=1, help="128³ crops per object (1 turns extension off).",
                                      rich_help_panel=ADVANCED),
        offline: bool = typer.Option(False, "--offline", envvar="FASTSAM3D_OFFLINE", help="Never download weights.",
                                     rich_help_panel=ADVANCED),
        max_sessions: int = typer.Option(8, "--max-sessions", min=1,
                                         help="Open sessions kept; the least recently used is closed beyond it.",
                                         rich_help_panel=LIMITS),
        max_memory: Optional[float] = typer.Option(None, "--max-memory", metavar="MB",
                                                   help="Approximate memory for sessions; least recently used ones "
                                                        "are closed beyond it.", rich_help_panel=LIMITS),
        max_upload: float = typer.Option(1024.0, "--max-upload", metavar="MB",
                                         help="Largest volume upload accepted (413 beyond).", rich_help_panel=LIMITS),
    ) -> None:
        """Serve a browser page and an HTTP API for interactive segmentation (click, undo, save) on this machine."""
        from fastsam3d_cli.serve.server import ServeOptions, run_server, stderr_say

        options = ServeOptions(volumes=list(volumes or []), host=host, port=port, root=root, token=token, model=model,
                               checkpoint=checkpoint, device=device, attention=attention, dtype=dtype,
                               max_crops=max_crops, max_sessions=max_sessions, max_memory_mb=max_memory,
                               max_upload_mb=max_upload, offline=offline or None)
        run_server(options, say=(lambda line: None) if state.quiet else stderr_say)
