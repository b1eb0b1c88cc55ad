"""common/ is a strict stack: no module imports, directly or through others, a module that imports it, and none
imports a script. Read from the source (every import statement, a function's own included), not by importing."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def imports_of(path):
    """The top-level names a file imports from the common package (``common.x``), and the other top-level modules
    it imports (``x`` of ``import x`` or ``from x import ...``)."""
    common, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "common":
                common |= {alias.name for alias in node.names}
            elif node.module.startswith("common."):
                common.add(node.module.split(".")[1])
            else:
                other.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                (common.add(alias.name.split(".")[1]) if alias.name.startswith("common.")
                 else other.add(alias.name.split(".")[0]))
    return common, other


def cycles(graph):
    """Every cycle of a directed graph {node: set of nodes}, each once, starting at its smallest node."""
    found = []

    def walk(path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                found.append(path + [nxt])
            elif nxt > path[0] and nxt not in path:
                walk(path + [nxt])

    for node in sorted(graph):
        walk([node])
    return found


def common_graph():
    modules = {p.stem: p for p in (ROOT / "common").glob("*.py") if p.stem != "__init__"}
    graph, scripts = {}, {}
    for name, path in modules.items():
        common, other = imports_of(path)
        graph[name] = (common & modules.keys()) - {name}
        scripts[name] = other & SCRIPTS
    return graph, scripts


def test_cycles_finds_every_loop_once():
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"], ["d", "d"]]


def test_common_is_a_strict_stack_and_imports_no_script():
    graph, scripts = common_graph()
    assert {"dist", "errors"} <= graph["cli"] and "checkpoint" in graph["engine"]  # the graph is read
    assert cycles(graph) == []
    assert {name: found for name, found in scripts.items() if found} == {}
