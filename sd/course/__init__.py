"""The course's machinery: the exercise checks (one module per notebook), staged help with the exercises
(`hint`, `solution`), prediction questions (`predict`) and the models the notebooks load."""
from .hints import hint, solution
from .models import CHECKPOINT_ENV, load_course_model, untrained_model
from .predict import predict
