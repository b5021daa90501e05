"""nbval settings for `pytest --nbval-lax notebooks solutions`: run the notebooks in pytest's own Python."""


def pytest_configure(config):
    # the kernel is the interpreter running pytest (the project's venv), whatever "python3" kernelspec is installed
    if hasattr(config.option, "nbval_current_env") and not config.option.nbval_kernel_name:
        config.option.nbval_current_env = True
