using System.Globalization;


namespace OrleansIdempotency.Testing;

/// <summary>A silo (<c>src/Silo</c>) or API (<c>src/Api</c>) process that can be killed, stopped, paused and started again on the same ports.</summary>
public sealed class NodeProcess
{
    private readonly string assembly;
    private readonly Dictionary<string, string> environment;
    private ServerProcess? process;

    private readonly string[] arguments;

    private NodeProcess(string name, string assembly, Dictionary<string, string> environment, int? httpPort, string[]? arguments = null)
    {
        Name = name;
        this.assembly = assembly;
        this.environment = environment;
        HttpPort = httpPort;
        this.arguments = arguments ?? [];
    }

    public string Name { get; }

    /// <summary>The API's HTTP port; null for a silo.</summary>
    public int? HttpPort { get; }

    public Uri? BaseAddress => HttpPort is { } port ? new Uri($"http://127.0.0.1:{port.ToString(CultureInfo.InvariantCulture)}") : null;

    public bool IsRunning => process is { HasExited: false };

    /// <summary>The operating system's id of the running process.</summary>
    public int? ProcessId => process?.Id;

    public string Output => process?.Output ?? "";

    public static NodeProcess Silo(string name, IReadOnlyDictionary<string, string> cluster)
    {
        var environment = new Dictionary<string, string>(cluster)
        {
            ["Orleans__Endpoints__SiloPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
            ["Orleans__Endpoints__GatewayPort"] = FreePort.Next().ToString(CultureInfo.InvariantCulture),
        };
        return new NodeProcess(name, Binaries.Silo, environment, httpPort: null);
    }

    public static NodeProcess Api(string name, IReadOnlyDictionary<string, string> cluster, IReadOnlyDictionary<string, string>? settings = null) =>
        Web(name, Binaries.Api, [], cluster, settings);

    /// <summary>Any ASP.NET Core program, configured and started the way <see cref="Api"/> is.</summary>
    public static NodeProcess Web(string name, string assembly, string[] arguments, IReadOnlyDictionary<string, string> cluster,
        IReadOnlyDictionary<string, string>? settings = null)
    {
        var port = FreePort.Next();
        var environment = new Dictionary<string, string>(cluster)
        {
            ["Orleans__Role"] = "Client",
            ["ASPNETCORE_ENVIRONMENT"] = "Development",
            ["ASPNETCORE_URLS"] = $"http://127.0.0.1:{port.ToString(CultureInfo.InvariantCulture)}",
        };
        foreach (var (key, value) in settings ?? new Dictionary<string, string>())
        {
            environment[key] = value;
        }

        return new NodeProcess(name, assembly, environment, port, arguments);
    }

    public void Start()
    {
        if (IsRunning)
        {
            throw new InvalidOperationException($"{Name} is already running.");
        }

        // From its own directory, so it finds its appsettings*.json as it does when deployed.
        process = ServerProcess.Start("dotnet", [assembly, .. arguments], environment: environment, workingDirectory: Path.GetDirectoryName(assembly));
    }

    /// <summary>kill -9: no shutdown, no goodbye to the cluster.</summary>
    public Task KillAsync() => SignalAndWaitAsync(9);

    /// <summary>SIGTERM: a graceful shutdown.</summary>
    public Task StopAsync() => SignalAndWaitAsync(15);

    /// <summary>SIGSTOP: the process freezes (as in a long GC pause or a VM stall) until <see cref="Resume"/>.</summary>
    public void Pause() => process?.Signal(19);

    /// <summary>SIGCONT.</summary>
    public void Resume() => process?.Signal(18);

    private async Task SignalAndWaitAsync(int signal)
    {
        if (process is not null)
        {
            await process.SignalAndWaitAsync(signal, TimeSpan.FromSeconds(30));
            process = null;
        }
    }
}

/// <summary>Where the built silo and API are: next to this test project's own configuration.</summary>
public static class Binaries
{
    /// <summary>The repository's root: where OrleansIdempotency.sln is.</summary>
    public static readonly string Root = FindRoot();
    private static readonly string Configuration = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd(Path.DirectorySeparatorChar)).Parent!.Name;

    public static string Silo => Find("Silo");

    public static string Api => Find("Api");

    private static string Find(string project)
    {
        var path = Path.Combine(Root, "src", project, "bin", Configuration, "net10.0", $"OrleansIdempotency.{project}.dll");
        return File.Exists(path) ? path : throw new FileNotFoundException($"Build src/{project} ({Configuration}) first.", path);
    }

    private static string FindRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "OrleansIdempotency.sln")))
            {
                return directory.FullName;
            }
        }

        throw new InvalidOperationException("OrleansIdempotency.sln not found above the test binaries.");
    }
}
