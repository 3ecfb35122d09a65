using System.Diagnostics;
using System.Text;

namespace OrleansIdempotency.Testing;

/// <summary>A server started as a child process, with its output kept for failure messages.</summary>
public sealed class ServerProcess
{
    private readonly StringBuilder output = new();
    private readonly Process process;

    private ServerProcess(Process process)
    {
        this.process = process;
    }

    /// <summary>The operating system's id of the process.</summary>
    public int Id => process.Id;

    /// <summary>True once the process has exited.</summary>
    public bool HasExited => process.HasExited;

    /// <summary>What the process wrote so far (stdout and stderr).</summary>
    public string Output
    {
        get
        {
            lock (output)
            {
                return output.ToString();
            }
        }
    }

    /// <summary>Starts <paramref name="fileName"/>, running it as <paramref name="user"/> when the tests run as root.</summary>
    public static ServerProcess Start(string fileName, IEnumerable<string> arguments, string? user = null,
        IReadOnlyDictionary<string, string>? environment = null, string? workingDirectory = null)
    {
        var start = RunAs(user, fileName, arguments);
        start.WorkingDirectory = workingDirectory ?? "";
        start.RedirectStandardOutput = true;
        start.RedirectStandardError = true;
        start.UseShellExecute = false;
        foreach (var (name, value) in environment ?? new Dictionary<string, string>())
        {
            start.Environment[name] = value;
        }

        var process = ChildProcesses.Start(start);
        var server = new ServerProcess(process);
        process.OutputDataReceived += (_, e) => server.Append(e.Data);
        process.ErrorDataReceived += (_, e) => server.Append(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return server;
    }

    /// <summary>A command line for <paramref name="fileName"/> that drops root privileges to <paramref name="user"/> by exec (no fork), so the pid is the server's own.</summary>
    public static ProcessStartInfo RunAs(string? user, string fileName, IEnumerable<string> arguments)
    {
        var start = new ProcessStartInfo();
        if (user is not null && Environment.UserName == "root")
        {
            start.FileName = "setpriv";
            foreach (var argument in new[] { $"--reuid={user}", $"--regid={user}", "--init-groups", "--", fileName })
            {
                start.ArgumentList.Add(argument);
            }
        }
        else
        {
            start.FileName = fileName;
        }

        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }

        return start;
    }

    /// <summary>Sends a signal: SIGKILL (9) for a crash, SIGTERM (15) or SIGINT (2) for a shutdown.</summary>
    public void Signal(int signal)
    {
        if (!process.HasExited)
        {
            _ = Kill(process.Id, signal);
        }
    }

    /// <summary>
    /// Sends <paramref name="signal"/> to the process and every process under it (a server's workers), parents first:
    /// SIGSTOP (19) then freezes the whole server before any of it can start another, SIGCONT (18) thaws it.
    /// </summary>
    public void SignalTree(int signal)
    {
        if (process.HasExited)
        {
            return;
        }

        var pending = new Queue<int>([process.Id]);
        while (pending.TryDequeue(out var pid))
        {
            _ = Kill(pid, signal);
            foreach (var child in ProcessCpu.ChildrenOf(pid))
            {
                pending.Enqueue(child);
            }
        }
    }

    // libc's kill(2): .NET sends only SIGKILL, and a fresh machine need not have procps' kill.
    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int Kill(int pid, int signal);

    /// <summary>Sends <paramref name="signal"/> and waits for the exit (killing the process if it outlasts <paramref name="timeout"/>).</summary>
    public async Task SignalAndWaitAsync(int signal, TimeSpan timeout)
    {
        Signal(signal);
        await WaitForExitAsync(timeout);
    }

    /// <summary>Waits for the process to exit, killing it if it has not within <paramref name="timeout"/>.</summary>
    public async Task WaitForExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
        }

        ChildProcesses.Forget(process);
    }

    private void Append(string? line)
    {
        if (line is null)
        {
            return;
        }

        lock (output)
        {
            output.AppendLine(line);
        }
    }
}
