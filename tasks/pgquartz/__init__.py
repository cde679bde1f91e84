"""PgQuartz job files: load and validate them unchanged, and plan their execution.

Pure: no Prefect, no database, no SSH; the only I/O is reading job files and their scripts.
`sources` picks a run's job source from the cluster's allow-list (pure; the clone is the flow's).
The `tab_job` flow wraps this: one task per step instance / check, SQL via psycopg, shell over SSH.
See /work/shared/reference/pgquartz.md for the format and PgQuartz's run-time semantics.
"""

from .loader import (
    JobFileError,
    Problem,
    executable_by_me,
    load_job,
    load_jobs,
    parse_job,
    read_script,
    script_escape,
    script_path,
)
from .model import (
    DEFAULT_ETCD_ENDPOINTS,
    DEFAULT_LOCK_TIMEOUT,
    SHELL,
    Check,
    Command,
    Connection,
    EtcdConfig,
    GitConfig,
    Job,
    Step,
    etcd_endpoint_address,
    is_loopback_endpoint,
    parse_go_duration,
)
from .plan import (
    MATRIX_ENV_PREFIX,
    ROLE_QUERY,
    Output,
    PlanError,
    check_passed,
    command_output,
    effective_role,
    expand_matrix,
    find_cycle,
    format_sql_rows,
    instance_env,
    job_action_plan,
    render_sql,
    role_problem,
    run_commands,
    run_waves,
    split_batch,
    sql_text_args,
    step_should_run,
    step_waves,
)
from .sources import (
    GIT_ALLOWED_PROTOCOLS,
    JobSource,
    JobSourceError,
    check_job_name,
    choose_source,
    clone_command,
    job_file,
)
from .when import (
    InstanceResult,
    StepResult,
    WhenExpressionError,
    evaluate_when,
    output_lines,
    render_result,
    result_lines,
    when_step_refs,
)

__all__ = [
    # model
    "Job", "Step", "Command", "Check", "Connection", "EtcdConfig", "GitConfig", "parse_go_duration",
    "SHELL", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_ETCD_ENDPOINTS", "etcd_endpoint_address", "is_loopback_endpoint",
    # loader
    "load_job", "load_jobs", "parse_job", "script_path", "read_script", "JobFileError", "Problem",
    "executable_by_me", "script_escape",
    # sources
    "JobSource", "JobSourceError", "choose_source", "check_job_name", "job_file", "clone_command",
    "GIT_ALLOWED_PROTOCOLS",
    # plan
    "step_waves", "find_cycle", "expand_matrix", "instance_env", "render_sql", "split_batch", "sql_text_args",
    "format_sql_rows", "effective_role", "check_passed", "step_should_run", "PlanError", "MATRIX_ENV_PREFIX",
    "job_action_plan", "run_waves", "ROLE_QUERY", "role_problem", "command_output", "run_commands", "Output",
    # when
    "evaluate_when", "when_step_refs", "StepResult", "InstanceResult", "output_lines", "result_lines",
    "render_result", "WhenExpressionError",
]
