using System.Globalization;

namespace OrleansIdempotency.Testing;

/// <summary>CPU time of processes, read from <c>/proc</c> (Linux): how a benchmark splits its cost by process.</summary>
public static class ProcessCpu
{
    // USER_HZ: /proc reports times in clock ticks, 100 per second on Linux.
    private const double TicksPerSecond = 100;

    /// <summary>User plus system time of <paramref name="pids"/> so far (processes gone meanwhile count zero).</summary>
    public static TimeSpan Of(IEnumerable<int> pids) =>
        TimeSpan.FromSeconds(pids.Sum(pid => Stat(pid) is { } fields ? long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture) : 0) / TicksPerSecond);

    /// <summary>The ids of the direct children of <paramref name="parent"/>.</summary>
    public static IEnumerable<int> ChildrenOf(int parent) =>
        Directory.EnumerateDirectories("/proc")
            .Select(Path.GetFileName)
            .Where(name => name!.All(char.IsAsciiDigit))
            .Select(name => int.Parse(name!, CultureInfo.InvariantCulture))
            .Where(pid => Stat(pid) is { } fields && fields[1] == parent.ToString(CultureInfo.InvariantCulture))
            .ToList();

    /// <summary>The fields of /proc/{pid}/stat after the command name (state first), or null when the process is gone.</summary>
    private static string[]? Stat(int pid)
    {
        try
        {
            var text = File.ReadAllText($"/proc/{pid.ToString(CultureInfo.InvariantCulture)}/stat");
            // The command name is in parentheses and may hold spaces: split after its closing one.
            return text[(text.LastIndexOf(')') + 2)..].Split(' ');
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}
