using System.Collections.Concurrent;
using System.Diagnostics;
using System.Globalization;

namespace OrleansIdempotency.Testing;

/// <summary>
/// Every server process the tests start, so that none outlives the test run: they are killed when the test
/// process exits, and their pids are written to <c>$IDEMPOTENCY_TEST_RUN_DIR/pids</c> for the test command to kill
/// if the test process itself dies (each file holds its process's start time, so a pid the system has since given
/// to another process is left alone). Their data directories are listed in <c>directories</c> there likewise.
/// </summary>
public static class ChildProcesses
{
    private static readonly ConcurrentDictionary<int, Process> Running = new();
    private static readonly string? PidDirectory = CreatePidDirectory();

    static ChildProcesses()
    {
        AppDomain.CurrentDomain.ProcessExit += (_, _) => KillAll();
    }

    /// <summary>Starts <paramref name="start"/> and tracks it until it exits.</summary>
    public static Process Start(ProcessStartInfo start)
    {
        var process = Process.Start(start) ?? throw new InvalidOperationException($"Could not start {start.FileName}.");
        Track(process);
        return process;
    }

    /// <summary>Tracks a process started elsewhere (for example a server whose pid is in a pid file).</summary>
    public static void Track(Process process)
    {
        Running[process.Id] = process;
        if (PidDirectory is not null)
        {
            File.WriteAllText(Path.Combine(PidDirectory, process.Id.ToString(CultureInfo.InvariantCulture)), StartTime(process.Id));
        }
    }

    /// <summary>A directory a server keeps its data in, for the test command to remove if the test process dies.</summary>
    public static void TrackDirectory(string directory)
    {
        if (PidDirectory is not null)
        {
            lock (Running)
            {
                File.AppendAllLines(Path.Combine(Path.GetDirectoryName(PidDirectory)!, "directories"), [directory]);
            }
        }
    }

    // The process's start time in clock ticks since boot (/proc/PID/stat's 22nd field, after the parenthesised name,
    // which may hold spaces): with the pid, it names one process for good. Empty where there is no /proc.
    private static string StartTime(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid.ToString(CultureInfo.InvariantCulture)}/stat");
            return stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[19];
        }
        catch (IOException)
        {
            return "";
        }
    }

    /// <summary>Forgets a process that has exited.</summary>
    public static void Forget(Process process)
    {
        Running.TryRemove(process.Id, out _);
        if (PidDirectory is not null)
        {
            File.Delete(Path.Combine(PidDirectory, process.Id.ToString(CultureInfo.InvariantCulture)));
        }
    }

    private static void KillAll()
    {
        foreach (var process in Running.Values)
        {
            try
            {
                process.Kill(entireProcessTree: true);
            }
            catch (InvalidOperationException)
            {
                // Already gone.
            }
        }
    }

    private static string? CreatePidDirectory()
    {
        var runDirectory = Environment.GetEnvironmentVariable("IDEMPOTENCY_TEST_RUN_DIR");
        if (string.IsNullOrEmpty(runDirectory))
        {
            return null;
        }

        var directory = Path.Combine(runDirectory, "pids");
        Directory.CreateDirectory(directory);
        return directory;
    }
}
