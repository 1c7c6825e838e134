"""The key under which Ray Data logs, once per process, that its progress bars are off.

The bars are off on purpose (`ray_reader.quiet_progress`), so that notice is marked as given
wherever Ray Data may run: in the process that builds the datasets (`quiet_progress`) and in
every Ray worker at start-up (`pipeline.distributed.console.quiet_ray_worker`). It lives apart
from `ray_reader` because it imports nothing: the worker start-up hook reads it without loading
Ray Data and torch into every Ray worker of the job.
"""

# Ray Data's `log_once` key for "Progress bars disabled. To enable, set ..." (a WARNING).
RAY_DATA_BARS_OFF_NOTICE = "ray_data_progress_manager_disabled"
