/*
 * engine/engine.c - shoal-engine: a C program that embeds CPython.
 *
 * The agent spawns one per engine. It starts the interpreter of the Python
 * environment that started the cluster ($SHOAL_PYTHON, else the one shoal
 * was built with), so the engine sees that environment's site-packages,
 * a virtual environment's included, and hands over to shoal._engine.main(),
 * which joins the agent and then runs the task loop of loop.c (the built-in
 * module _shoal_engine).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "loop.h"

#ifndef SHOAL_DEFAULT_PYTHON
#error "SHOAL_DEFAULT_PYTHON must name the Python the engine embeds"
#endif

static int fail(PyStatus st)
{
    fprintf(stderr, "shoal-engine: cannot start Python: %s%s%s\n", st.func ? st.func : "",
            st.func ? ": " : "", st.err_msg ? st.err_msg : "unknown error");
    return 1;
}

int main(int argc, char **argv)
{
    /* Die with the agent that spawned us: an engine without its agent has no
     * one to take its results. If the agent is already gone, go now. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    const char *agent = getenv("SHOAL_AGENT_PID");
    if (agent && *agent && atoi(agent) != (int)getppid()) {
        fprintf(stderr, "shoal-engine: the agent (pid %s) is already gone\n", agent);
        return 1;
    }
    const char *python = getenv("SHOAL_PYTHON");
    if (!python || !*python)
        python = SHOAL_DEFAULT_PYTHON;

    if (PyImport_AppendInittab("_shoal_engine", shoal_engine_loop_init) < 0) {
        fprintf(stderr, "shoal-engine: cannot register the engine's loop\n");
        return 1;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    /* Our arguments are ours (shoal._engine reads them), not python's options. */
    config.parse_argv = 0;
    /* Taking the environment's interpreter as our program name and
     * executable makes Python find its prefix the same way that interpreter
     * does: a venv's pyvenv.cfg, and so the venv's site-packages. */
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, python);
    if (!PyStatus_Exception(st))
        st = PyConfig_SetBytesString(&config, &config.executable, python);
    if (!PyStatus_Exception(st))
        st = PyConfig_SetBytesArgv(&config, argc, argv);
    if (!PyStatus_Exception(st))
        st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st))
        return fail(st);

    int rc = 1;
    PyObject *mod = PyImport_ImportModule("shoal._engine");
    PyObject *res = mod ? PyObject_CallMethod(mod, "main", NULL) : NULL;
    if (res) {
        rc = res == Py_None ? 0 : (int)PyLong_AsLong(res);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            rc = 1;
        }
    } else if (PyErr_ExceptionMatches(PyExc_SystemExit)) {
        rc = Py_FinalizeEx() < 0 ? 120 : 0;
        return rc;
    } else {
        PyErr_Print();
    }
    Py_XDECREF(res);
    Py_XDECREF(mod);
    if (Py_FinalizeEx() < 0)
        rc = 120;
    return rc;
}
