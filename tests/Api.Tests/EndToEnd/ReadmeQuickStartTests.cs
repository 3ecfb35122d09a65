using System.Diagnostics;
using System.Text.Json;
using System.Text.RegularExpressions;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>Runs the README's quick-start <c>curl</c> lines against a real server, so they stay true.</summary>
[Collection(EndToEndCollection.Name)]
public sealed partial class ReadmeQuickStartTests(EndToEndFixture fixture)
{
    [Fact]
    public async Task QuickStartCurlLines_CreateOneOrder_AndTheSecondIsAReplay()
    {
        var commands = QuickStartCommands();
        Assert.True(commands.Count >= 3, "The README's quick start should POST twice and list the orders.");

        var outputs = new List<string>();
        foreach (var command in commands)
        {
            outputs.Add(await RunAsync(command.Replace("http://localhost:5000", fixture.Api.BaseAddress.ToString().TrimEnd('/'), StringComparison.Ordinal)));
        }

        Assert.Contains("HTTP/1.1 201 Created", outputs[0], StringComparison.Ordinal);
        Assert.DoesNotContain("Idempotent-Replayed", outputs[0], StringComparison.Ordinal);
        Assert.Contains("HTTP/1.1 201 Created", outputs[1], StringComparison.Ordinal);
        Assert.Contains("Idempotent-Replayed: true", outputs[1], StringComparison.Ordinal);
        var id = JsonDocument.Parse(Body(outputs[0])).RootElement.GetProperty("id").GetString();
        Assert.Equal(Body(outputs[0]), Body(outputs[1]));
        var orders = JsonDocument.Parse(outputs[2]).RootElement.EnumerateArray();
        Assert.Single(orders, o => o.GetProperty("id").GetString() == id);
    }

    /// <summary>The <c>curl</c> commands of the README's quick-start block, continuation lines joined.</summary>
    private static List<string> QuickStartCommands()
    {
        var readme = File.ReadAllText(Path.Combine(Binaries.Root, "README.md"));
        var block = QuickStartBlock().Match(readme);
        Assert.True(block.Success, "README.md has no <!-- quickstart --> block.");
        return block.Groups["body"].Value.Replace("\\\n", " ", StringComparison.Ordinal)
            .Split('\n')
            .Select(line => line.Trim())
            .Where(line => line.StartsWith("curl ", StringComparison.Ordinal))
            .ToList();
    }

    private static string Body(string curlOutput) => curlOutput[(curlOutput.IndexOf("\r\n\r\n", StringComparison.Ordinal) + 4)..];

    private static async Task<string> RunAsync(string command)
    {
        var start = new ProcessStartInfo("bash", ["-c", command]) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = Process.Start(start)!;
        var output = await process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync();
        Assert.True(process.ExitCode == 0, $"'{command}' failed: {await process.StandardError.ReadToEndAsync()}");
        return output;
    }

    [GeneratedRegex("<!-- quickstart -->\\s*```sh\\n(?<body>.*?)```", RegexOptions.Singleline)]
    private static partial Regex QuickStartBlock();
}
