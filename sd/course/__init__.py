"""The course's machinery: the exercise checks (one module per notebook) and the models the notebooks load."""
from .models import CHECKPOINT_ENV, load_course_model, untrained_model
