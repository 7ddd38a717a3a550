"""Running agents behind the capture proxy and rebuilding their conversations.

    from rollouttap.manager import AgentManager, CommandAgent

    with AgentManager(agent=CommandAgent("my-agent {prompt}"), store="runs.db",
                      model_url="http://127.0.0.1:8000/v1") as manager:
        results = manager.deploy(["task one", "task two"])
"""

from rollouttap.manager.agents import AgentSpec, CommandAgent, EntryPointAgent, LaunchContext, Prompt
from rollouttap.manager.manager import AgentManager, new_agent_id
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
from rollouttap.manager.results import AgentResult, Summary, summarise

__all__ = [
    "AgentManager", "AgentResult", "AgentSpec", "CommandAgent", "EntryPointAgent", "LaunchContext", "Prompt",
    "ProxyConfig", "ProxyProcess", "Summary", "new_agent_id", "summarise",
]
