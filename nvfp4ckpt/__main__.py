from nvfp4ckpt.cli import run

run()
